"""The one learning-rate schedule and its horizon: known up front for a step budget, measured for a time
budget, kept across a resume, and one schedule for a run stopped early and resumed toward the same horizon."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import diffssl_plugin  # noqa: F401
from diffssl_plugin.methods.training import Budget, pretrain
from diffssl_plugin.optim import warmup_cosine

TINY_SIMCLR = {
    "method_kwargs": {"backbone_args": {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64)}, "projection_dim": 8},
    "batch_size": 16,
    "max_images": 200,
    "progress": False,
    "logger": False,
}


def _factors(sched, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    return out


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_unknown_horizon_is_constant_until_set_then_cosine_to_the_end_value():
    sched = warmup_cosine(_optimizer(), warmup_steps=3, total_steps=None, end_value=0.1)
    assert _factors(sched, 6) == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])
    sched.set_horizon(16)
    later = _factors(sched, 14)  # steps 6 … 19; step 6's rate was set before the horizon was
    assert later[0] == 1
    assert later[1] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 4 / 12)) / 2)  # lightly's cosine
    assert all(a > b for a, b in itertools.pairwise(later[1:10]))
    assert later[9:] == pytest.approx([0.1] * 5)  # the end value at step 15 (= horizon − 1) and after


def test_the_horizon_survives_the_state_dict():
    sched = warmup_cosine(_optimizer(), 0, None)
    sched.set_horizon(40)
    fresh = warmup_cosine(_optimizer(), 0, None)
    fresh.load_state_dict(sched.state_dict())
    assert fresh.total_steps == 40


def test_a_time_budget_measures_its_horizon_and_decays_over_it(tmp_path):
    result = pretrain("simclr", budget=Budget(minutes=0.25), out_dir=tmp_path, **TINY_SIMCLR)
    assert result.schedule_horizon is not None
    # the measured horizon is close to the steps the budget allowed (the machine's speed may drift a little)
    assert 0.5 * result.steps <= result.schedule_horizon <= 2 * result.steps
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["lr_schedulers"][0]["total_steps"] == result.schedule_horizon


def test_ddae_keeps_its_constant_rate_under_a_time_budget(tmp_path):
    from conftest import TINY_UNET

    kwargs = {**TINY_SIMCLR, "method_kwargs": {"unet_config": {**TINY_UNET, "sample_size": 28}, "warmup_steps": 2}}
    result = pretrain("ddae", budget=Budget(minutes=0.2), out_dir=tmp_path, **kwargs)
    assert result.schedule_horizon is None
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["lr_schedulers"][0]["total_steps"] is None


def test_stopping_early_and_resuming_toward_the_same_horizon_is_one_run(tmp_path):
    """The learning-curve preset's path: stop at 3 steps, resume to 6, all under a 6-step horizon."""
    straight, staged = tmp_path / "straight", tmp_path / "staged"
    pretrain("simclr", budget=Budget(steps=6), out_dir=straight, **TINY_SIMCLR)
    first = pretrain("simclr", budget=Budget(steps=3), horizon=Budget(steps=6), out_dir=staged, **TINY_SIMCLR)
    assert (first.steps, first.schedule_horizon) == (3, 6)
    pretrain("simclr", budget=Budget(steps=6), horizon=Budget(steps=6), out_dir=staged, **TINY_SIMCLR)
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(staged / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=f"{key} differs")
