"""Atomic writes, JSON helpers, hashes and safe weight loading."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from diffssl_plugin.errors import CheckpointError
from diffssl_plugin.io import (
    append_jsonl,
    atomic_path,
    file_sha256,
    load_weights,
    save_safetensors,
    state_dict_sha256,
    write_json,
)


class NeedsCode:
    """A class only this module defines: unpickling it would run (our) code."""

    def __init__(self):
        self.weight = torch.ones(3)


def _state_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(8, 4, 3, 3, generator=g),
        "conv.bias": torch.randn(8, generator=g),
        "steps": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
    }


def _equal_dicts(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- atomic writes
def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
        assert not target.exists()  # nothing visible until the body finishes
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_path_leaves_nothing_behind_on_error(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half a result")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_write_json_round_trip(tmp_path):
    obj = {"a": 1, "b": [1.5, "x"], "nested": {"ok": True}, "path": tmp_path}
    p = write_json(tmp_path / "r.json", obj)
    back = json.loads(p.read_text())
    assert back == {"a": 1, "b": [1.5, "x"], "nested": {"ok": True}, "path": str(tmp_path)}
    write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}


def test_append_jsonl_round_trip(tmp_path):
    p = tmp_path / "log.jsonl"
    append_jsonl(p, [{"step": 1, "loss": 0.5}])
    append_jsonl(p, [{"step": 2, "loss": 0.25}, {"step": 3, "note": "x"}])
    lines = p.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 0.5},
        {"step": 2, "loss": 0.25},
        {"step": 3, "note": "x"},
    ]
    # a file whose last line lacks its newline still gets whole lines appended
    q = tmp_path / "partial.jsonl"
    q.write_text('{"a": 1}')
    append_jsonl(q, [{"b": 2}])
    assert [json.loads(line) for line in q.read_text().splitlines()] == [{"a": 1}, {"b": 2}]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["log.jsonl", "partial.jsonl"]


def test_file_sha256_of_file_and_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.bin").write_bytes(b"abc")
    h1 = file_sha256(tmp_path / "d")
    assert file_sha256(tmp_path / "d") == h1
    (tmp_path / "d" / "a.bin").write_bytes(b"abd")
    assert file_sha256(tmp_path / "d") != h1
    import hashlib

    f = tmp_path / "f.bin"
    f.write_bytes(b"xyz")
    expected = hashlib.sha256(b"f.bin" + b"xyz").hexdigest()
    assert file_sha256(f) == expected


# ---------------------------------------------------------------- hashes
def test_state_dict_sha256_changes_with_one_value():
    sd = _state_dict()
    h = state_dict_sha256(sd)
    assert len(h) == 64 and state_dict_sha256({k: v.clone() for k, v in sd.items()}) == h
    changed = {k: v.clone() for k, v in sd.items()}
    changed["conv.weight"][3, 2, 1, 0] += 1e-3
    assert state_dict_sha256(changed) != h
    renamed = {("x." + k if k == "conv.bias" else k): v for k, v in sd.items()}
    assert state_dict_sha256(renamed) != h
    reshaped = dict(sd, **{"conv.bias": sd["conv.bias"].view(2, 4)})
    assert state_dict_sha256(reshaped) != h
    # key order does not matter
    assert state_dict_sha256(dict(reversed(list(sd.items())))) == h


def test_state_dict_sha256_handles_scalar_tensors():
    sd = torch.nn.BatchNorm1d(3).state_dict()  # holds the 0-dim num_batches_tracked
    h = state_dict_sha256(sd)
    sd["num_batches_tracked"] += 1
    assert state_dict_sha256(sd) != h


# ---------------------------------------------------------------- safe loading
def test_safetensors_round_trip(tmp_path):
    sd = _state_dict()
    p = save_safetensors(sd, tmp_path / "w.safetensors", metadata={"step": "7"})
    _equal_dicts(load_weights(p), sd)
    assert [x.name for x in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left


def test_weights_only_pt_round_trip(tmp_path):
    sd = _state_dict()
    p = tmp_path / "w.pt"
    torch.save(sd, p)
    _equal_dicts(load_weights(p), sd)
    # nested plain containers are fine too
    torch.save({"model": sd, "step": 3}, p)
    back = load_weights(p)
    assert back["step"] == 3
    _equal_dicts(back["model"], sd)


def test_load_weights_missing(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(tmp_path)  # a folder is not a checkpoint file


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])  # names must not contain "empty"
def test_load_weights_empty(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"")
    with pytest.raises(CheckpointError) as ei:
        load_weights(p)
    assert "empty" in str(ei.value).replace(str(p), "")  # tmp_path itself contains the test's name


def test_load_weights_truncated_safetensors(tmp_path):
    p = save_safetensors(_state_dict(), tmp_path / "w.safetensors")
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted") as ei:
        load_weights(p)
    assert str(p) in str(ei.value)
    p.write_bytes(raw[:5])  # not even a whole header length
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_weights(p)


def test_load_weights_truncated_pt(tmp_path):
    p = tmp_path / "w.pt"
    torch.save(_state_dict(), p)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_weights(p)


def test_load_weights_refuses_torch_pickle_needing_code(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"obj": NeedsCode()}, p)
    with pytest.raises(CheckpointError, match=r"refusing .*pickle") as ei:
        load_weights(p)
    assert "safetensors" in str(ei.value)  # it says what to do instead


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_load_weights_refuses_plain_pickle(tmp_path):
    p = tmp_path / "evil.ckpt"
    p.write_bytes(pickle.dumps(NeedsCode()))
    with pytest.raises(CheckpointError, match=r"refusing .*pickle"):
        load_weights(p)


_WRITER = """
import sys
from diffssl_plugin.eval.records import write_records
path, who = sys.argv[1], sys.argv[2]
for i in range(300):  # one record per call: the most interleaving
    write_records(path, [{"writer": who, "i": i, "pad": "x" * 2000}])
"""


def test_concurrent_writers_lose_no_record(tmp_path):
    """Three processes appending 300 records each to one file at once (three `diffssl eval` sharing --out)."""
    import subprocess
    import sys

    from diffssl_plugin.eval.records import read_records

    path = tmp_path / "records.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), w]) for w in "abc"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    records = read_records(path)
    assert len(records) == 900
    assert {(r["writer"], r["i"]) for r in records} == {(w, i) for w in "abc" for i in range(300)}


def test_records_reader_skips_torn_and_garbage_lines_with_a_warning(tmp_path):
    from diffssl_plugin.eval.records import read_records, write_records

    path = tmp_path / "records.jsonl"
    write_records(path, [{"a": 1}])
    with open(path, "a") as fh:
        fh.write('not json at all\n[1, 2]\n{"torn": ')  # garbage, a non-record, a writer killed mid-line
    write_records(path, [{"b": 2}])  # starts a new line after the torn one
    with pytest.warns(UserWarning) as caught:
        records = read_records(path)
    assert records == [{"a": 1}, {"b": 2}]
    messages = [str(w.message) for w in caught]
    assert [m.split(": skipped")[0] for m in messages] == [f"{path}:{n}" for n in (2, 3, 4)]
