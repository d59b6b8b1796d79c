"""Pretraining: budgets, step-indexed data, exact resume after an interruption, export round trips, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import timm
import torch
from conftest import TINY_UNET as CONFTEST_UNET

import diffssl_plugin  # noqa: F401
from diffssl_plugin.data import load_split
from diffssl_plugin.methods.base import StartAt, StepBatches
from diffssl_plugin.methods.training import Budget, pretrain

TINY_UNET = {**CONFTEST_UNET, "sample_size": 28, "add_attention": False}
TINY = {
    "method_kwargs": {"unet_config": TINY_UNET, "warmup_steps": 2},
    "batch_size": 16,
    "max_images": 200,
    "progress": False,
    "logger": False,
}


def test_budget_parse_and_steps():
    assert Budget.parse("4min") == Budget(minutes=4.0)
    assert Budget.parse("90s") == Budget(minutes=1.5)
    assert Budget.parse("2e12flops,50steps") == Budget(flops=2e12, steps=50)
    assert Budget(flops=1000.0).max_steps(flops_per_step=300.0) == 3
    assert Budget(flops=1000.0, steps=2).max_steps(300.0) == 2
    with pytest.raises(ValueError, match="4min"):
        Budget.parse("four minutes")


def test_step_batches_are_deterministic_and_shard_under_ddp():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 2, 2).contiguous()
    labels = torch.arange(40)
    full = StepBatches(images, labels, global_batch_size=8, seed=3)
    again = StepBatches(images, labels, global_batch_size=8, seed=3)
    assert torch.equal(full[7][1], again[7][1])  # same step → same batch, whatever came before
    epoch0 = torch.cat([full[s][1] for s in range(5)])
    assert sorted(epoch0.tolist()) == list(range(40))  # an epoch is a permutation
    assert not torch.equal(full[0][1], full[5][1])  # next epoch, new order
    ranks = [StepBatches(images, labels, 8, seed=3, rank=r, world_size=2)[4][1] for r in range(2)]
    assert sorted(torch.cat(ranks).tolist()) == sorted(full[4][1].tolist())
    assert list(StartAt(3, 6)) == [3, 4, 5]
    with pytest.raises(ValueError, match="divisible"):
        StepBatches(images, labels, 9, world_size=2)


def test_pretrain_respects_step_budget_and_exports(tmp_path):
    result = pretrain("ddae", budget=Budget(steps=4), out_dir=tmp_path, checkpoint_every=2, **TINY)
    assert result.steps == 4 and result.images_seen == 4 * 16
    assert result.train_flops == pytest.approx(result.flops_per_image * 16 * 4)
    assert result.flops_per_image > 0 and result.wall_seconds > 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob("*.tmp"))
    export = tmp_path / "export"
    assert json.loads((export / "pretrain.json").read_text())["steps"] == 4
    backbone = timm.create_model(f"local-dir:{export / 'backbone'}", pretrained=True)
    from diffssl_plugin.backbones import DDAEBackbone

    from_diffusers = DDAEBackbone.from_diffusers(
        str(export / "diffusers"), block=backbone.block, pool=backbone.pool, timestep=backbone.timestep
    )
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(backbone(x), from_diffusers(x))


def test_cpu_training_steps_use_the_math_attention_backend(tmp_path, monkeypatch, sdpa_flash_allowed):
    """The fused CPU attention kernel is slow for short sequences in bf16 (backbones/sdpa.py): bf16 training
    steps and U-Net feature extraction run with it disabled, and the math backend gives the same outputs. Training
    runs in bf16 only on CPUs with bf16 hardware (runtime.cpu_has_fast_bf16): one is assumed here, so the test runs
    the same on every CPU."""
    from diffusers import UNet2DModel

    import diffssl_plugin.runtime as runtime
    from diffssl_plugin.backbones.ddae import DDAEBackbone
    from diffssl_plugin.backbones.sdpa import cpu_math_attention
    from diffssl_plugin.methods.ddae import DDAE

    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)

    seen = []
    original = DDAE.training_loss

    def spy(self, images, generator):
        seen.append(torch.backends.cuda.flash_sdp_enabled())
        return original(self, images, generator)

    monkeypatch.setattr(DDAE, "training_loss", spy)
    pretrain("ddae", budget=Budget(steps=2), out_dir=tmp_path, checkpoint_every=10, **TINY)
    assert seen == [False, False, False]  # the FLOP count (it counts the math path) and the two steps
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after the step

    torch.manual_seed(0)
    unet = UNet2DModel(**{**TINY_UNET, "add_attention": True})  # attention in the middle block
    x, t = torch.rand(4, 1, 28, 28) * 2 - 1, torch.tensor([3, 50, 400, 999])
    with torch.no_grad():
        fused = unet(x, t).sample
        with cpu_math_attention("cpu", always=True):
            math = unet(x, t).sample
    torch.testing.assert_close(math, fused, rtol=1e-4, atol=1e-5)
    backbone = DDAEBackbone(unet=unet, block="mid")
    sdpa_flash_allowed.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        backbone.extract(x, [10], ["mid"])
    backbone.extract(x, [10], ["mid"])  # fp32: the fused kernel is the faster one there, PyTorch chooses
    assert sdpa_flash_allowed == [False, True]


def test_flops_budget_sets_the_step_count(tmp_path):
    probe = pretrain("ddae", budget=Budget(steps=1), out_dir=tmp_path / "probe", **TINY)
    step_flops = probe.flops_per_image * 16
    result = pretrain("ddae", budget=Budget(flops=3.5 * step_flops), out_dir=tmp_path / "run", **TINY)
    assert result.steps == 3  # floor(3.5): never over budget, at most one step under
    assert result.train_flops <= 3.5 * step_flops


class _Crash(pl.Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated power cut")


def _final_weights(out_dir):
    ckpt = torch.load(out_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["global_step"]


def test_resume_after_interruption_is_exact(tmp_path):
    straight = tmp_path / "straight"
    pretrain("ddae", budget=Budget(steps=6), out_dir=straight, checkpoint_every=2, **TINY)
    broken = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="power cut"):
        pretrain(
            "ddae", budget=Budget(steps=6), out_dir=broken, checkpoint_every=2, callbacks=[_Crash(at_step=5)], **TINY
        )
    assert _final_weights(broken)[1] == 4  # the last checkpoint written before the crash
    pretrain("ddae", budget=Budget(steps=6), out_dir=broken, checkpoint_every=2, **TINY)
    a, step_a = _final_weights(straight)
    b, step_b = _final_weights(broken)
    assert step_a == step_b == 6
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")


def test_gradient_accumulation_counts_images_per_optimisation_step(tmp_path):
    seen = []

    class Batches(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.global_step, batch[1].clone()))

    result = pretrain(
        "ddae", budget=Budget(steps=2), out_dir=tmp_path, accumulate_grad_batches=3, callbacks=[Batches()], **TINY
    )
    assert result.steps == 2 and result.global_batch_size == 48 and result.images_seen == 96
    assert result.train_flops == pytest.approx(result.flops_per_image * 96)
    assert [s for s, _ in seen] == [0, 0, 0, 1, 1, 1]  # three micro-batches per optimisation step
    labels = load_split("fashion_mnist", "trainval").balanced_subset(total=200, seed=0).labels
    stream = StepBatches(torch.zeros(len(labels), 1, 1, 1, dtype=torch.uint8), labels, global_batch_size=16)
    for m, (_, got) in enumerate(seen):  # micro-batch m of the run is item m of the step-indexed stream
        assert torch.equal(got, stream[m][1]), m


def test_unknown_method_lists_valid_ones(tmp_path):
    from diffssl_plugin.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="ddae"):
        pretrain("byol", budget=Budget(steps=1), out_dir=tmp_path, **TINY)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    """Lightning's DDP (gloo) with 2 CPU processes, launched the way users launch it: the CLI."""
    args = [
        "--method",
        "ddae",
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--budget",
        "3steps",
        "--batch-size",
        "16",
        "--max-images",
        "200",
        "--out",
        str(tmp_path),
        "--no-progress",
        "--method-args",
        json.dumps({"unet_config": TINY_UNET, "warmup_steps": 2}),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "diffssl_plugin.cli", "pretrain", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert result["steps"] == 3 and result["global_batch_size"] == 16
    assert "ddp" in proc.stderr.lower() or "distributed" in proc.stderr.lower()
    assert (tmp_path / "export" / "backbone" / "model.safetensors").is_file()


def test_ddae_does_not_flip_digits():
    """DDAE's flip follows the dataset (``DatasetSpec.hflip``; False for digits), as DRL's does."""
    from diffssl_plugin.data import DATASETS
    from diffssl_plugin.methods.ddae import DDAE

    x = torch.rand(8, 1, 28, 28)
    unet = {**TINY_UNET, "sample_size": 28}
    assert not DATASETS["mnist5k"].hflip and DATASETS["fashion_mnist"].hflip
    kept = DDAE(unet_config=unet, hflip=False).transform(x, torch.Generator().manual_seed(0))
    assert torch.equal(kept, x * 2 - 1)
    flipped = DDAE(unet_config=unet).transform(x, torch.Generator().manual_seed(0))
    same = [torch.equal(f, u) for f, u in zip(flipped, x * 2 - 1)]
    mirrored = [torch.equal(f, u.flip(-1)) for f, u in zip(flipped, x * 2 - 1)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored)  # each image kept or mirrored, some mirrored
