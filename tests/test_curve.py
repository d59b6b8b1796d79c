"""``diffssl bench --preset curve``: one run per learner, stopped and evaluated at every point, a table and a
plot, and a re-run that redoes nothing finished."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_UNET

import diffssl_plugin.curve as curve
from diffssl_plugin.bench import PRESETS, BenchPreset, run_bench
from diffssl_plugin.errors import UsageError
from diffssl_plugin.eval import EvalConfig
from diffssl_plugin.methods.training import Budget, pretrain

TINY_KWARGS = {
    "ddae": {"unet_config": {**TINY_UNET, "sample_size": 28, "add_attention": False}, "warmup_steps": 2},
    "simclr": {"backbone_args": {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64)}, "projection_dim": 8},
}
TINY_CURVE = BenchPreset(
    methods=("ddae", "simclr"),
    protocols=("linear",),
    batch_size=16,
    max_pretrain_images=200,
    eval=EvalConfig(
        train_images=200,
        val_images=100,
        test_images=200,
        timesteps=(0, 10),
        blocks=("mid",),
        pools=("avg",),
        final_cs=(1.0,),
        knn_ks=(20,),
    ),
    method_kwargs=TINY_KWARGS,
    curve_points=(Budget(steps=2), Budget(steps=4)),
)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_curve_preset_is_the_default_learners_at_1_3_10_minutes():
    cfg, default = PRESETS["curve"], PRESETS["default"]
    assert cfg.curve_points == (Budget(minutes=1), Budget(minutes=3), Budget(minutes=10))
    # the default's learners and settings, whatever its numbers are
    for name in ("methods", "method_kwargs", "batch_size", "method_batch_size", "max_pretrain_images", "eval"):
        assert getattr(cfg, name) == getattr(default, name), name
    assert cfg.protocols == ("linear",) and cfg.budget == Budget(minutes=10)


def test_budget_override_sets_the_last_point_and_scales_the_others():
    minutes = PRESETS["curve"].curve_points
    assert curve.curve_points(minutes) == minutes
    assert curve.curve_points(minutes, Budget(steps=500)) == tuple(Budget(steps=s) for s in (50, 150, 500))
    assert curve.curve_points(minutes, Budget(minutes=5)) == tuple(Budget(minutes=m) for m in (0.5, 1.5, 5))
    # points that scaling makes equal are kept once
    assert curve.curve_points(minutes, Budget(steps=2)) == (Budget(steps=1), Budget(steps=2))


def test_a_tiny_curve_is_one_resumed_run_per_learner_and_a_rerun_redoes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny_curve", TINY_CURVE)
    out = tmp_path / "curve"
    markdown, records = run_bench("tiny_curve", out, progress=False)

    # records for every learner at every point, and raw pixels once
    saved = _lines(out / "records.jsonl")
    assert len(saved) == len(records)
    linear = {(r["method"], r["curve"]["point"]): r for r in saved if r["protocol"]["name"] == "linear"}
    assert set(linear) == {("raw_pixels", None)} | {(m, p) for m in ("ddae", "simclr") for p in ("2steps", "4steps")}
    assert {(r["method"], r["curve"]["point"]) for r in saved if r["protocol"]["name"] == "knn20"} == set(linear)
    for method in ("ddae", "simclr"):
        first, last = linear[method, "2steps"]["budget"], linear[method, "4steps"]["budget"]
        # budgets are cumulative: the second point counts all four steps
        assert (first["steps"], last["steps"]) == (2, 4)
        assert 0 < first["train_flops"] < last["train_flops"] == pytest.approx(2 * first["train_flops"])
        assert first["images_seen"] < last["images_seen"] and first["wall_seconds"] <= last["wall_seconds"]
        assert linear[method, "2steps"]["checkpoint_hash"] != linear[method, "4steps"]["checkpoint_hash"]
    assert all(r["curve"]["horizon"] == "4steps" for r in saved)
    # one schedule: SimCLR's cosine decays over the last point at both points (DDAE keeps a constant rate)
    assert [linear["simclr", p]["curve"]["schedule_horizon"] for p in ("2steps", "4steps")] == [4, 4]
    assert json.loads((out / "simclr" / "export" / "pretrain.json").read_text())["schedule_horizon"] == 4
    assert linear["ddae", "4steps"]["curve"]["schedule_horizon"] is None

    # the final weights are those of a straight run to the last point
    for method in ("ddae", "simclr"):
        straight = tmp_path / f"straight_{method}"
        pretrain(
            method,
            budget=Budget(steps=4),
            out_dir=straight,
            batch_size=16,
            max_images=200,
            progress=False,
            logger=False,
            method_kwargs=TINY_KWARGS[method],
        )
        staged = _weights(out / method)
        for key, value in _weights(straight).items():
            torch.testing.assert_close(staged[key], value, rtol=0, atol=0, msg=f"{method}: {key} differs")

    # the table and the plot
    table = (out / "curve.md").read_text()
    assert table == markdown
    assert "| raw pixels | — |" in table and "| simclr | 4steps |" in table and "kNN k=20 %" in table
    assert len(table.splitlines()) == 2 + 1 + 2 * 2
    assert (out / "curve.png").stat().st_size > 0
    assert (out / "ddae" / "eval_2steps").is_dir()  # each point's sweep heatmap has its own folder
    assert json.loads((out / "bench.json").read_text())["points"] == ["2steps", "4steps"]

    # a re-run trains and evaluates nothing: every point's records are there
    def refuse(*args, **kwargs):
        raise AssertionError("a finished point was redone")

    monkeypatch.setattr(curve, "pretrain", refuse)
    monkeypatch.setattr(curve, "evaluate", refuse)
    again, reused = run_bench("tiny_curve", out, progress=False)
    assert again == markdown and len(reused) == len(records)
    assert len(_lines(out / "records.jsonl")) == len(saved)

    # a run trained past a point whose records are gone cannot go back to it
    (out / "records.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in saved if (r["method"], r["curve"]["point"]) != ("ddae", "2steps"))
    )
    with pytest.raises(UsageError, match="past 2steps"):
        run_bench("tiny_curve", out, progress=False)

    # stopped after training SimCLR to its last point but before its records were written: evaluated, not trained
    kept = [r for r in saved if (r["method"], r["curve"]["point"]) != ("simclr", "4steps")]
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    evaluated = []
    monkeypatch.setattr(curve, "evaluate", lambda *a, **kw: evaluated.append(kw["budget"]["steps"]) or [])
    run_bench("tiny_curve", out, progress=False)
    assert evaluated == [4]
