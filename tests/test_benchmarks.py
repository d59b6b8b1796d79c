"""The benchmark scripts run end to end and write what they promise (a few steps: speed targets are checked by
running the scripts themselves, not here)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

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
            "--no-baselines",
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
        "gemm_bf16_gflops",
        "plain_loop_images_per_s",
        "lightning_images_per_s",
        "train_to_bf16_gemm_ratio",
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
            "256",
            "--no-adm",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    result = json.loads(out.read_text())
    assert result["extract_images"] == 256 and len(result["extract_readouts"]) == 9
    assert math.isfinite(result["extract_images_per_s"]) and result["extract_images_per_s"] > 0
