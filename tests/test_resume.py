"""Exact resume for every registered learner at its default settings: a pretraining process killed with
SIGKILL at a random point after its first checkpoint (mid-step, between steps, or while a checkpoint is being
written), then resumed, ends with exactly the weights of an uninterrupted run (bit for bit)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffssl_plugin
from diffssl_plugin.methods.training import Budget, pretrain

STEPS, EVERY = 7, 2  # the kill lands on a step in 3..6, after the first checkpoint
RUN = {"batch_size": 4, "max_images": 20, "checkpoint_every": EVERY, "progress": False, "logger": False}
BUDGET = Budget(steps=STEPS, minutes=30.0)  # a time budget too: Lightning's Timer is saved and restored
HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_save_checkpoint",
)

KILLED = textwrap.dedent(
    """
    import os, signal, sys
    import pytorch_lightning as pl
    from diffssl_plugin.methods.training import Budget, pretrain

    method, out, hook, at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    class Kill(pl.Callback):
        pass

    def kill(self, trainer, *args, **kwargs):
        if trainer.global_step == at:
            os.kill(os.getpid(), signal.SIGKILL)

    setattr(Kill, hook, kill)
    pretrain(method, budget=Budget(steps={steps}, minutes=30.0), out_dir=out, callbacks=[Kill()], **{run})
    """
)


def _weights(out) -> dict[str, torch.Tensor]:
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    weights = {f"ckpt/{k}": v for k, v in ckpt["state_dict"].items()}
    weights.update({f"export/{k}": v for k, v in load_file(str(out / "export/backbone/model.safetensors")).items()})
    return weights


@pytest.mark.parametrize("method", ["simclr", "mae", "ddae", "drl", "vdrl", "mdsm"])
def test_sigkill_and_resume_is_bit_exact(method, tmp_path):
    rng = random.Random(method)  # a random kill point, reproducible per learner
    hook = rng.choice(HOOKS)
    at = rng.randint(EVERY + 1, STEPS - 1) if hook != "on_save_checkpoint" else 2 * EVERY
    if hook in ("on_train_batch_end", "on_save_checkpoint"):  # global_step counts the step just taken
        at = min(at, STEPS - 1)
    broken = tmp_path / "broken"
    script = KILLED.format(steps=STEPS, run=RUN)
    root = str(Path(diffssl_plugin.__file__).resolve().parents[1])  # this checkout, not another install
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", script, method, str(broken), hook, str(at)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    straight = tmp_path / "straight"
    pretrain(method, budget=BUDGET, out_dir=straight, **RUN)  # meanwhile, the uninterrupted run
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, err.decode()[-2000:]  # killed, not finished or crashed
    ckpt = torch.load(broken / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert EVERY <= ckpt["global_step"] < STEPS
    elapsed = ckpt["callbacks"]["WallClock"]["elapsed"]
    assert elapsed > 0 and ckpt["callbacks"]["Timer"]["time_elapsed"]["train"] > 0
    result = pretrain(method, budget=BUDGET, out_dir=broken, **RUN)
    assert result.steps == STEPS and result.wall_seconds >= elapsed  # the wall clock went on from the checkpoint
    a, b = _weights(straight), _weights(broken)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{method} (killed at {hook}, step {at}): {len(differ)} tensors differ, e.g. {differ[:3]}"
