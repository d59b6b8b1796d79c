"""Result records: every number is one JSON line carrying its full configuration (lm-evaluation-harness style):
method, backbone, checkpoint hash, pretraining budget, protocol, readout, seed, package versions and machine."""

from __future__ import annotations

import os
import platform
import time
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ..io import append_jsonl

PACKAGES = ("diffssl-plugin", "torch", "torchvision", "timm", "lightly", "diffusers", "scikit-learn",
            "torchmetrics", "pytorch-lightning", "safetensors", "numpy")


@lru_cache(maxsize=1)
def environment() -> dict:
    """Package versions and a description of the machine."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    machine = {"platform": platform.platform(), "python": platform.python_version(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return {"versions": versions, "machine": machine}


def make_record(*, method: str, backbone: str, dataset: str, split: str, protocol: dict, metric: str,
                value: float, checkpoint_hash: str | None = None, budget: dict | None = None,
                readout: dict | None = None, seed: int = 0, **extra) -> dict:
    """One result with everything needed to reproduce it."""
    return {"method": method, "backbone": backbone, "dataset": dataset, "split": split, "metric": metric,
            "value": value, "protocol": protocol, "readout": readout or {}, "checkpoint_hash": checkpoint_hash,
            "budget": budget or {}, "seed": seed, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **environment(), **extra}


def write_records(path: str | os.PathLike, records: list[dict]) -> Path:
    """Append records to a JSONL file (atomically)."""
    return append_jsonl(path, records)


def read_records(path: str | os.PathLike) -> list[dict]:
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no records file at {path}; run `diffssl eval` or `diffssl bench` first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
