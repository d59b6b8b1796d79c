"""The benchmark scripts run end to end and write what they promise (a few steps: speed targets are checked by
running the scripts themselves, not here)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_UNET

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_throughput_script_writes_its_figures(tmp_path):
    out = tmp_path / "throughput.json"
    subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "throughput.py"),
            "--steps",
            "2",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--batch-size",
            "16",
            "--gemm-size",
            "256",
            "--no-baselines",
            "--method-args",
            json.dumps({"unet_config": {**TINY_UNET, "sample_size": 28}}),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    result = json.loads(out.read_text())
    assert result["steps_timed"] == {"plain_loop": 2, "lightning": 2}
    for key in (
        "gemm_gflops",
        "plain_loop_images_per_s",
        "lightning_images_per_s",
        "train_to_gemm_ratio",
        "extract_images_per_s_mid",
        "flops_per_image_train",
    ):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert math.isfinite(result["harness_overhead"])
    achieved = result["lightning_images_per_s"] * result["flops_per_image_train"] / 1e9
    assert result["train_gflops_achieved"] == pytest.approx(achieved)


def test_construction_script_writes_its_figures(tmp_path):
    out = tmp_path / "construction.json"
    subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "construction.py"),
            "--repeats",
            "1",
            "--images",
            "64",
            "--no-adm",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    result = json.loads(out.read_text())
    assert result["extract_images"] == 64 and len(result["extract_readouts"]) == 9
    assert math.isfinite(result["extract_images_per_s"]) and result["extract_images_per_s"] > 0


def test_drl_level_of_detail_script_writes_its_pictures(tmp_path):
    """Two samplers × two seeds of a few steps on mnist5k: the summary, the per-run record and both pictures; and
    the stroke width of a drawn bar is its width."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("drl_lod", BENCHMARKS / "drl_level_of_detail.py")
    lod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lod)
    bars = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    bars[0, 0, 10:12, 4:24], bars[1, 0, 10:14, 4:24] = 255, 255  # 2 and 4 pixels wide, 20 long
    torch.testing.assert_close(lod.stroke_width(bars), torch.tensor([80 / 44, 160 / 48]))

    args = ["--steps", "2", "--seeds", "0", "1", "--batch-size", "8", "--max-images", "300", "--grid", "2"]
    args += ["--sample-steps", "3", "--out", str(tmp_path)]
    record = lod.main(args)
    assert record["dataset"] == "mnist5k" and record["args"]["l1"] > 0
    for sampler in ("uniform_t", "uniform_sigma"):
        assert [r["seed"] for r in record["runs"][sampler]] == [0, 1]
        for name, stats in record["summary"][sampler].items():
            values = [r[name] for r in record["runs"][sampler]]
            assert stats["mean"] == pytest.approx(sum(values) / 2) and stats["std"] >= 0, name
        assert (tmp_path / f"samples_{sampler}.png").stat().st_size > 0
    assert (tmp_path / "codes.png").stat().st_size > 0
    assert json.loads((tmp_path / "drl_level_of_detail.json").read_text())["args"]["steps"] == 2


def test_recipe_search_scores_candidates_on_validation_and_skips_finished_ones(tmp_path, monkeypatch):
    """Two tiny SimCLR candidates for two steps each: one row per candidate with validation numbers only, the
    table best first, and a second run that trains nothing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe_search", BENCHMARKS / "recipe_search.py")
    search = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(search)
    tiny = {"backbone_args": {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64)}, "projection_dim": 8}
    grid = {
        "a": {"batch_size": 16, "method_kwargs": tiny},
        "b": {"batch_size": 16, "method_kwargs": {**tiny, "lr": 0.3}},
    }
    monkeypatch.setitem(search.GRIDS, "simclr", grid)
    assert search.main(["simclr", "--budget", "2steps", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "simclr.jsonl").read_text().splitlines()]
    assert [r["candidate"] for r in rows] == ["a", "b"] and rows[1]["method_kwargs"]["lr"] == 0.3
    for row in rows:
        assert row["steps"] == 2 and row["budget"] == "2steps"
        assert 0 < row["val_linear"] <= 1 and 0 < row["val_knn20"] <= 1 and "test" not in json.dumps(row)
    table = (tmp_path / "simclr.md").read_text().splitlines()
    assert len(table) == 4 and float(table[2].split("|")[6]) >= float(table[3].split("|")[6])
    monkeypatch.setattr(search, "run_candidate", lambda *a, **k: pytest.fail("a finished candidate was rerun"))
    assert search.main(["simclr", "--budget", "2steps", "--out", str(tmp_path)]) == 0


def test_memory_format_script_times_both_layouts(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import memory_format

    out = tmp_path / "memory_format.json"
    names = ["ddae_unet_fmnist", "simclr_resnet18_cifar"]  # a swept diffusion backbone and a pooled-output one
    result = memory_format.main([*names, "--batch-size", "4", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == result and list(result["backbones"]) == names
    for rates in result["backbones"].values():
        assert set(rates) == {"nchw", "channels_last"} and all(v > 0 and math.isfinite(v) for v in rates.values())


def test_feature_geometry_script_reports_shared_direction_and_knn(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import feature_geometry

    out = tmp_path / "geometry.json"
    args = ["--model", "raw_pixels", "--train-images", "200", "--val-images", "100", "--test-images", "100"]
    result = feature_geometry.main([*args, "--precision", "fp32", "--out", str(out)])
    assert json.loads(out.read_text()) == result and result["dims"] == 784
    assert result["precision"] == "32-true" and 0.5 < result["linear"] <= 1 and result["linear_C"] in (0.01, 0.1, 1.0)
    in_bf16 = feature_geometry.main([*args, "--precision", "bf16", "--out", str(tmp_path / "bf16.json")])
    assert in_bf16["precision"] == "bf16-mixed"  # raw pixels have no layer autocast could round
    assert (in_bf16["linear"], in_bf16["knn_raw"]) == (result["linear"], result["knn_raw"])
    assert 0 < result["cos_to_mean"] < 1 and result["cos_to_mean_min"] <= result["cos_to_mean"]
    # raw pixels share no dominant direction: float32 and float64 cosines give the same neighbours
    assert result["knn_raw"] == pytest.approx(result["knn_raw_float32"]) and result["knn_raw"] > 0.5
    # a shared offset 10,000 times the images' spread: float32 loses the neighbours, the harness's kNN does not
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 10
    x = 1000.0 + 0.1 * torch.nn.functional.one_hot(y, 64).float() + 0.01 * torch.randn(400, 64, generator=gen)
    shifted = feature_geometry.geometry(x[:200], y[:200], x[200:], y[200:], k=20)
    assert shifted["cos_to_mean"] > 0.999999 and shifted["knn_raw"] == 1.0 and shifted["knn_raw_float32"] < 0.6


def test_readout_pooling_script_compares_trained_and_random_weights_per_pooling(tmp_path, monkeypatch):
    """One row per (weights, pooling) plus raw pixels: the random-init copy has the export's architecture but
    not its weights, each sweep picks a readout of its own pooling, and one pick per weights is marked."""
    from diffssl_plugin.loading import export
    from diffssl_plugin.methods.ddae import DDAE

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import readout_pooling

    torch.manual_seed(1)
    learner = DDAE(unet_config={**TINY_UNET, "sample_size": 28, "add_attention": False}, in_chans=1).eval()
    with torch.no_grad():  # weights that no initialisation draws: the random-init row cannot be the export
        for p in learner.parameters():
            p.add_(0.05)
    folder = export(learner, tmp_path / "export")
    out = tmp_path / "pooling.json"
    args = [str(folder), "--preset", "smoke", "--pools", "avg,avg2x2", "--work", str(tmp_path / "w"), "--out", str(out)]
    rows = readout_pooling.main(args)
    assert json.loads(out.read_text())["rows"] == rows
    assert [(r["init"], r["pool"]) for r in rows] == [
        ("-", "-"),
        ("trained", "avg"),
        ("trained", "avg2x2"),
        ("random (seed 0)", "avg"),
        ("random (seed 0)", "avg2x2"),
    ]
    assert rows[0]["backbone"] == "raw_pixels" and rows[0]["readout"] == "pooled output"
    for row in rows[1:]:
        assert row["readout"].endswith(f"({row['pool']})") and 0 < row["linear"] <= 100 and row["sweep_val"] > 0
    assert sum(bool(r.get("main_job_pick")) for r in rows[1:3]) == 1
    assert sum(bool(r.get("main_job_pick")) for r in rows[3:]) == 1
    trained, random = (rows[1], rows[3])
    assert (trained["linear"], trained["knn20"]) != (random["linear"], random["knn20"])
