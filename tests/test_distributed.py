"""Several processes behave like one: ``diffssl eval`` and ``diffssl bench`` under 2 CPU processes (gloo,
``--accelerator cpu --devices 2 --strategy ddp``) give one set of records, the same as one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TINY_UNET

from diffssl_plugin.runtime import Runtime

DETERMINISTIC = ("sweep_linear", "linear", "knn20", "knn200")  # and semisup{fraction}_linear


def _deterministic(name: str) -> bool:
    return name in DETERMINISTIC or (name.startswith("semisup") and name.endswith("_linear"))


PROTOCOLS = "linear,semisup,attention,finetune"
EXTRA = {
    # labelled subsets drawn from the cached 600-image evaluation subset, as the default preset does (drawn
    # from the 60k train split, 10% fine-tuned the U-Net on 6,000 images twice per run: 100 of this file's 170 s)
    "semisup": {
        "pool": "eval_train",
        "fractions": [0.1, 0.5],
        "ft_fractions": [0.1],
        "seeds": [0, 1],
        "finetune": {"epochs": 1, "batch_size": 16},
        "ft_val_images": 100,
        "ft_test_images": 100,
        "cs": [0.1, 1.0],
    },
    "attention": {"train_images": 400, "val_images": 200, "training_kwargs": {"epochs": 4, "batch_size": 32}},
    "finetune": {"train_images": 200, "epochs": 1, "batch_size": 32},
}


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "diffssl_plugin.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def _finish(proc: subprocess.Popen, timeout: int = 600) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-4000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return _finish(_start(args, cwd), timeout)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _key(r: dict) -> tuple:
    p = r["protocol"]
    return (
        p["name"],
        r.get("split"),
        r.get("dataset"),
        json.dumps(r.get("readout"), sort_keys=True),
        p.get("fraction"),
        p.get("seed", r.get("seed")),
        r.get("metric"),
    )


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """A DDAE export (tiny 28×28 U-Net, 4 pretraining steps) to evaluate."""
    from diffssl_plugin.methods.training import Budget, pretrain

    out = tmp_path_factory.mktemp("ddae")
    unet = {**TINY_UNET, "sample_size": 28}
    pretrain(
        "ddae",
        budget=Budget(steps=4),
        out_dir=out,
        batch_size=16,
        max_images=200,
        progress=False,
        logger=False,
        runtime=Runtime(accelerator="cpu"),
        method_kwargs={"unet_config": unet, "warmup_steps": 2},
    )
    return out / "export"


@pytest.mark.slow
def test_eval_on_two_processes_matches_one(tiny_export, tmp_path):
    common = [
        "eval",
        "--checkpoint",
        str(tiny_export),
        "--protocol",
        PROTOCOLS,
        "--train-images",
        "600",
        "--val-images",
        "300",
        "--test-images",
        "400",
        "--timesteps",
        "0,10",
        "--blocks",
        "mid,up0",
        "--pools",
        "avg",
        "--extra",
        json.dumps(EXTRA),
        "--accelerator",
        "cpu",
        "--no-progress",
    ]
    # both runs at once (each process single-threaded): their records do not depend on timing
    one_proc = _start([*common, "--out", str(tmp_path / "one")], tmp_path)
    try:
        two = _cli([*common, "--out", str(tmp_path / "two"), "--devices", "2", "--strategy", "ddp"], tmp_path)
        _finish(one_proc)
    finally:
        one_proc.kill()  # no-op once it has finished; never left running after a failure
    assert two.stdout.count("| method") <= 1  # one leaderboard printed, by rank 0
    one, both = _records(tmp_path / "one" / "records.jsonl"), _records(tmp_path / "two" / "records.jsonl")
    keys_one, keys_two = Counter(map(_key, one)), Counter(map(_key, both))
    assert max(keys_two.values()) == 1, "a record is duplicated"
    assert keys_one == keys_two, f"missing: {keys_one - keys_two}; extra: {keys_two - keys_one}"
    by_key = {_key(r): r for r in one}
    names, off = set(), []
    for r in both:
        ref = by_key[_key(r)]
        names.add(r["protocol"]["name"])
        # trained heads and fine-tuning take the same steps on the same images, but float sums in another
        # order (DDP's all-reduce, other extraction batches) move a short run's accuracy a little
        tolerance = 1e-4 if _deterministic(r["protocol"]["name"]) else 0.1
        if abs(r["value"] - ref["value"]) > tolerance:
            off.append((_key(r), ref["value"], r["value"]))
    assert not off, off
    assert {"linear", "knn20", "semisup10_linear", "semisup50_linear", "semisup10_ft", "attention", "finetune"} <= names
    assert all(r["runtime"]["world_size"] == 2 for r in both)
    # an export's records carry its learner and its pretraining budget (pretrain.json)
    assert {(r["method"], r["budget"]["steps"]) for r in both} == {("ddae", 4)}


@pytest.mark.slow
def test_bench_smoke_on_two_processes_writes_one_set_of_records(tmp_path):
    _cli(
        [
            "bench",
            "--preset",
            "smoke",
            "--methods",
            "ddae",
            "--accelerator",
            "cpu",
            "--devices",
            "2",
            "--strategy",
            "ddp",
            "--out",
            str(tmp_path / "bench"),
            "--no-progress",
        ],
        tmp_path,
        timeout=900,
    )
    records = _records(tmp_path / "bench" / "records.jsonl")
    assert {r["method"] for r in records} == {"raw_pixels", "ddae"}
    counts = Counter((r["method"], *_key(r)) for r in records)
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]
    assert (tmp_path / "bench" / "leaderboard.md").is_file()
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["runtime"]["world_size"] == 2


def test_shards_cover_every_row_once():
    rt = Runtime()
    assert list(rt.shard(5)) == [0, 1, 2, 3, 4]
    torch.testing.assert_close(rt.gather_shards(torch.ones(5, 2), 5), torch.ones(5, 2))


@pytest.mark.parametrize("n", [0, 1, 7, 64, 200, 257, 1000])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("multiple", [1, 64])
def test_shards_are_contiguous_cover_every_row_once_and_cut_on_batch_boundaries(n, world_size, multiple):
    from diffssl_plugin.runtime import shard_range

    parts = [shard_range(n, r, world_size, multiple) for r in range(world_size)]
    assert [i for p in parts for i in p] == list(range(n))  # in order, each row once
    assert all(p.start % multiple == 0 for p in parts if len(p))  # one process's batch grid
    blocks = [-(-len(p) // multiple) for p in parts]
    assert max(blocks) - min(blocks) <= 1  # balanced to within one batch
    if multiple == 1:  # the old split: lengths differ by at most one
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("name", ["ddae", "simclr", "mae", "drl", "vdrl", "mdsm"])
def test_every_trainable_parameter_gets_a_gradient(name):
    """DDP (without find_unused_parameters) needs a gradient for every trainable parameter at every step."""
    from diffssl_plugin.methods import get_method

    model = get_method(name)["model"](batch_size_per_device=4, in_chans=1)
    images = torch.rand(4, 1, 28, 28)
    model.training_loss(images, torch.Generator().manual_seed(0)).backward()
    # (the online classifier is trained in training_step from the labels, so it has its gradient there)
    unused = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is None and not n.startswith("online_classifier.")
    ]
    assert not unused, f"{name}: parameters without a gradient: {unused}"
