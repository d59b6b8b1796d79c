"""The training helper every supervised loop runs through (``diffssl_plugin.supervised``): epoch plans, each
rank's part of a global batch, the shared warm-up + cosine schedule, the four loops on one process, and two
CPU processes (gloo) taking the steps one process takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from diffssl_plugin import runtime
from diffssl_plugin.data import load_segmentation, load_split
from diffssl_plugin.eval import EvalConfig
from diffssl_plugin.eval.finetune import FinetuneRecipe, finetune
from diffssl_plugin.eval.harness import load_eval_splits
from diffssl_plugin.eval.segmentation_features import FeatureStore
from diffssl_plugin.eval.segmentation_heads import train_linear_head, train_mlp_ensemble
from diffssl_plugin.heads import AttentionHead, HeadTraining, tensor_rows, train_head
from diffssl_plugin.supervised import RankBatches, SupervisedModule, shuffled_batches

WORKER = Path(__file__).parent / "ddp_training_worker.py"


def _sizes(batches) -> list[int]:
    return [len(b) for b in batches]


def test_epoch_plans_draw_one_permutation_per_epoch():
    plan = shuffled_batches(10, 4, torch.Generator().manual_seed(0))
    first, second = plan(), plan()
    assert _sizes(first) == [4, 4]  # full batches only
    ref = torch.Generator().manual_seed(0)
    assert torch.equal(torch.cat(first), torch.randperm(10, generator=ref)[:8])
    assert torch.equal(torch.cat(second), torch.randperm(10, generator=ref)[:8])
    assert _sizes(shuffled_batches(3, 4, torch.Generator())()) == [3]  # fewer rows than a batch: one batch
    assert _sizes(shuffled_batches(9, 4, torch.Generator(), drop_last=False, min_rows=2)()) == [4, 4]
    assert _sizes(shuffled_batches(10, 4, torch.Generator(), drop_last=False, min_rows=2)()) == [4, 4, 2]


def test_ranks_take_contiguous_parts_weighted_by_their_share():
    batches = [torch.arange(7), torch.arange(7, 14), torch.arange(14, 15)]  # the last: fewer rows than ranks
    ranks = [list(RankBatches(lambda: batches, rank, 2)) for rank in (0, 1)]
    assert len(RankBatches(lambda: batches, 0, 2)) == 2 and len(RankBatches(lambda: batches, 0, 1)) == 3
    for step, batch in enumerate(batches[:2]):
        (a, share_a), (b, share_b) = ranks[0][step], ranks[1][step]
        assert torch.equal(torch.cat([a, b]), batch) and (len(a), len(b)) == (4, 3)
        # DDP averages the ranks' gradients: the share-weighted part means average to the whole batch's mean
        mean = (share_a * a.float().mean() + share_b * b.float().mean()) / 2
        assert float(mean) == pytest.approx(float(batch.float().mean()))
    one = RankBatches(lambda: batches)
    assert [(len(p), s) for p, s in one] == [(7, 1.0), (7, 1.0), (1, 1.0)] and one.rows == 15


class Steps(list):
    """The world size at each optimiser step taken through the helper's LightningModule, and the classes of
    the schedules it stepped."""

    schedules: set[str]

    def clear(self) -> None:
        super().clear()
        self.schedules.clear()


@pytest.fixture
def steps(monkeypatch) -> Steps:
    calls = Steps()
    calls.schedules = set()
    original = SupervisedModule.training_step

    def counting(self, batch, batch_idx):
        calls.append(self.trainer.world_size)
        calls.schedules.add(type(self.scheduler).__name__)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(SupervisedModule, "training_step", counting)
    return calls


def test_heads_and_finetuning_train_through_the_helper(steps):
    data = load_split("fashion_mnist", "test", download=False)
    maps, labels = data.images[:96].float().div(255), data.labels[:96]
    head = AttentionHead((1, 28, 28), 10, dim=16, pool_size=4, depth=1, num_heads=2, mlp_ratio=1.0)
    rows = tensor_rows(maps, labels)
    res = train_head(head, rows, rows, HeadTraining(epochs=2, batch_size=40, eval_every=2))
    assert steps == [1] * 4 and res.images_seen == 160 and res.best_epoch == 2
    assert steps.schedules == {"CosineWarmup"}  # diffssl_plugin.optim.warmup_cosine, the one schedule
    assert [sorted(h) for h in res.history] == [["epoch", "loss"], ["epoch", "loss", "val_acc"]]

    steps.clear()
    splits = load_eval_splits(EvalConfig(train_images=100, val_images=50, test_images=50))
    res = finetune(
        timm.create_model("raw_pixels"),
        *splits,
        recipe=FinetuneRecipe(epochs=2, batch_size=30, probe_cs=(0.1,), hflip=True),
    )
    assert steps == [1] * 6 and len(res.val_curve) == 3 and res.val_acc == max(res.val_curve)
    assert steps.schedules == {"CosineWarmup"}
    assert next(res.model.parameters()).device == runtime.current().device and 0 <= res.test_acc <= 1


def test_segmentation_heads_train_through_the_helper(steps, tmp_path):
    """Both segmentation loops, the linear head on scenes' pixels as features (a 1-scene last batch: skipped)."""
    train, val = (load_segmentation("fashion_scenes", split, num_images=n) for split, n in (("train", 13), ("val", 6)))
    stores = []
    for d in (train, val):
        np.save(tmp_path / f"{d.split}.npy", d.images.float().div(255).numpy().astype(np.float16))
        stores.append(FeatureStore(tmp_path / f"{d.split}.npy"))
    settings = {"head_batch_size": 4, "head_epochs": 2, "head_lr": 0.03, "head_weight_decay": 1e-4}
    head, curve, best = train_linear_head((stores[0], train), (stores[1], val), settings)
    assert steps == [1] * 6 and len(curve) == 2 and best in (1, 2)  # batches of 4, 4, 4 and 1 scenes
    assert steps.schedules == {"CosineWarmup"}
    assert not head.training

    steps.clear()
    x = torch.randn(300, 3).half()
    y = torch.arange(300) % 4
    settings = {"mlp_members": 2, "mlp_hidden": (8, 4), "mlp_lr": 1e-2, "mlp_batch_size": 64, "mlp_epochs": 2}
    net = train_mlp_ensemble(x, y, 4, settings)
    assert steps == [1] * 10 and not net.training  # 300 = 4 × 64 + 44 per epoch


@pytest.mark.slow
def test_two_processes_take_the_same_steps_as_one(tmp_path):
    """A head, LP-FT fine-tuning and a (sum, count) pixel loss over uneven batches, trained by 1 and by 2 CPU
    processes: the same scores, losses and weights (only the gradient reduction's float order differs)."""
    # both runs at once, every process single-threaded (3 on the 2 cores): results do not depend on timing
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path / str(n)), str(n)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (1, 2)
    ]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
    finally:
        for proc in procs:
            proc.kill()  # no-op once finished; none left running after a failure
    one, two = (json.loads((tmp_path / str(n) / "result.json").read_text()) for n in (1, 2))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for part in ("attention", "finetune"):
        for key in ("val_acc", "test_acc"):
            assert two[part][key] == pytest.approx(one[part][key], abs=1e-4), (part, key)
    assert two["finetune"]["val_curve"] == pytest.approx(one["finetune"]["val_curve"], abs=1e-4)
    for part in ("attention", "pixels"):
        assert two[part]["loss"] == pytest.approx(one[part]["loss"], rel=1e-5), part
    assert two["attention"]["images_seen"] == one["attention"]["images_seen"] and two["pixels"]["steps"] == 10
    # while training each rank draws its own random numbers (its rows are other images); afterwards rank 0's
    training, after = two["draws"]["training"], two["draws"]["after"]
    assert training[0] != training[1] and after[0] == after[1]
    w1, w2 = (torch.load(tmp_path / str(n) / "weights.pt") for n in (1, 2))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
