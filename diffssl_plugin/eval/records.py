"""Result records: every number is one JSON line carrying its full configuration (lm-evaluation-harness style):
method, backbone, checkpoint hash, pretraining budget, protocol, readout, seed, package versions and machine."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ..io import append_jsonl
from ..runtime import cpu_has_fast_bf16

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
def cpu_name() -> str | None:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``), None if unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


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
        # time budgets buy very different work on different CPUs (bf16 hardware or not: runtime.cpu_has_fast_bf16)
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": cpu_has_fast_bf16(),
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


def _is_object(record: object) -> str | None:
    return None if isinstance(record, dict) else f"not a JSON object but {type(record).__name__}"


def record_problem(record: object) -> str | None:
    """Why ``record`` cannot be one leaderboard entry (a missing or mistyped field), or None if it can."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    for key in ("method", "backbone", "split"):
        if not isinstance(record.get(key), str):
            return f"field {key!r} is missing or not a string"
    protocol = record.get("protocol")
    if not isinstance(protocol, dict) or not isinstance(protocol.get("name"), str):
        return "field 'protocol' is missing or has no 'name'"
    value = record.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"field 'value' is not a number: {value!r}"
    for key in ("readout", "budget", "eval_config"):
        if record.get(key) is not None and not isinstance(record[key], dict):
            return f"field {key!r} is not a JSON object"
    for key, number in (record.get("budget") or {}).items():
        if key in ("wall_seconds", "steps", "train_flops") and not isinstance(number, (int, float, type(None))):
            return f"budget {key!r} is not a number: {number!r}"
    return None


def read_records(path: str | os.PathLike, check: Callable[[dict], str | None] | None = None) -> list[dict]:
    """The records of a JSONL file. A line that is not a JSON object (torn by a killed writer, or garbage), or
    that ``check`` finds a problem with (e.g. :func:`record_problem`: a record a leaderboard cannot show), is
    skipped with a warning naming the file, the line number and the problem; the other records are kept. A
    missing or unreadable file raises :class:`~diffssl_plugin.errors.FileFormatError`."""
    import json
    import warnings

    from ..errors import FileFormatError, MissingFileError

    path = Path(path)
    if path.is_dir():
        raise FileFormatError(f"{path} is a folder, not a records file (did you mean {path / 'records.jsonl'}?)")
    if not path.is_file():
        raise MissingFileError(f"no records file at {path}; run `diffssl eval` or `diffssl bench` first")
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise FileFormatError(f"cannot read records file {path}: {e.strerror or e}") from e
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            problem = "not JSON (a torn write or garbage)"
        else:
            problem = (check or _is_object)(record)
        if problem is not None:
            warnings.warn(f"{path}:{number}: skipped a line: {problem}: {line[:60]!r}", stacklevel=2)
            continue
        records.append(record)
    return records
