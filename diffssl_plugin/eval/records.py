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

PACKAGES = (
    "diffssl-plugin",
    "torch",
    "torchvision",
    "timm",
    "lightly",
    "diffusers",
    "scikit-learn",
    "torchmetrics",
    "pytorch-lightning",
    "safetensors",
    "numpy",
)


@lru_cache(maxsize=1)
def environment() -> dict:
    """Package versions and a description of the machine."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return {"versions": versions, "machine": machine}


def make_record(
    *,
    method: str,
    backbone: str,
    dataset: str,
    split: str,
    protocol: dict,
    metric: str,
    value: float,
    checkpoint_hash: str | None = None,
    budget: dict | None = None,
    readout: dict | None = None,
    seed: int = 0,
    **extra,
) -> dict:
    """One result with everything needed to reproduce it."""
    return {
        "method": method,
        "backbone": backbone,
        "dataset": dataset,
        "split": split,
        "metric": metric,
        "value": value,
        "protocol": protocol,
        "readout": readout or {},
        "checkpoint_hash": checkpoint_hash,
        "budget": budget or {},
        "seed": seed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **environment(),
        **extra,
    }


def write_records(path: str | os.PathLike, records: list[dict]) -> Path:
    """Append records to a JSONL file (whole lines, safe for concurrent writers: :func:`append_jsonl`)."""
    return append_jsonl(path, records)


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file. A line that is not a JSON object (torn by a killed writer, or garbage) is
    skipped with a warning naming the file and line number; the other records are kept."""
    import json
    import warnings

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no records file at {path}; run `diffssl eval` or `diffssl bench` first")
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            warnings.warn(
                f"{path}:{number}: skipped a line that is not a JSON record (a torn write or garbage): {line[:60]!r}",
                stacklevel=2,
            )
            continue
        records.append(record)
    return records
