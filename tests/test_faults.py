"""The README's fault table ("What happens when…"), kept true: every bad input gives one line naming the problem
and a non-zero exit code (2: usage, 1: runtime failure), with no traceback; caches shared by two processes or
torn by a killed writer never hand out wrong features.

Most faults run in-process (``cli.main``); one subprocess proves "no traceback, right exit code" end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_UNET

from diffssl_plugin.cli import main
from diffssl_plugin.errors import CheckpointError, FileFormatError, UnknownNameError

ROOT = Path(__file__).resolve().parents[1]  # the worktree whose package the subprocesses must import


def _python(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, **kwargs
    )


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory):
    """The subprocess checks (~5 s of imports each), started together before the in-process tests so that
    they run meanwhile: the CLI end to end, and two processes sharing one feature cache, the first of which
    then writes one more entry and is killed in the middle of it."""
    tmp = tmp_path_factory.mktemp("background")
    (tmp / "shared").mkdir()
    started = {
        "cli": (_python("-m", "diffssl_plugin", "leaderboard", str(tmp / "none.jsonl")), tmp / "none.jsonl"),
        "sharers": (
            [_python("-c", _SHARER, str(tmp / "shared" / "cache"), str(w), str(tmp / "killed")) for w in (0, 1)],
            tmp / "shared" / "cache",
            tmp / "killed",
        ),
    }
    yield started
    for p in [started["cli"][0], *started["sharers"][0]]:
        if p.poll() is None:
            p.kill()
        p.communicate()


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``diffssl ARGV`` in-process; argparse's usage errors arrive as SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, err


def assert_one_line(err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A tiny DDAE export (8-channel U-Net on 28×28 grey images)."""
    from diffssl_plugin.loading import export
    from diffssl_plugin.methods.ddae import DDAE

    config = {**TINY_UNET, "sample_size": 28, "add_attention": False}
    return export(DDAE(unet_config=config, in_chans=1).eval(), tmp_path_factory.mktemp("faults") / "export")


# ---------------------------------------------------------------------------------------------- usage errors (2)
USAGE = [
    # pretrain
    (["pretrain", "--batch-size", "0"], ["--batch-size", "positive"]),
    (["pretrain", "--max-images", "-5"], ["--max-images", "positive", "-5"]),
    (["pretrain", "--method", "byol"], ["unknown method 'byol'", "ddae"]),
    (["pretrain", "--dataset", "imagenet-z"], ["unknown dataset 'imagenet-z'", "fashion_mnist"]),
    (["pretrain", "--budget", "forever"], ["--budget", "cannot read budget"]),
    (["pretrain", "--budget", "0steps"], ["--budget", "must be positive"]),
    (["pretrain", "--method-args", "{bad"], ["--method-args", "not valid JSON"]),
    (["pretrain", "--method-args", "[1, 2]"], ["--method-args", "JSON object"]),
    (["pretrain", "--accumulate-grad-batches", "0"], ["--accumulate-grad-batches", "positive"]),
    (["pretrain", "--seed", "-1"], ["--seed", "≥ 0"]),
    (["pretrain", "--devices", "-3"], ["--devices", "'-3'"]),
    (["pretrain", "--precision", "8"], ["--precision", "invalid choice"]),
    (["pretrain", "--logger", "mlflow"], ["--logger", "invalid choice", "wandb"]),
    # eval
    (["eval", "--model", "raw_pixels", "--train-images", "0"], ["--train-images", "positive"]),
    (["eval", "--model", "resnet_nope"], ["unknown timm model 'resnet_nope'", "closest"]),
    (["eval", "--model", "raw_pixels", "--protocol", "nope"], ["unknown protocol 'nope'", "linear"]),
    (["eval", "--model", "raw_pixels", "--blocks", "mid"], ["raw_pixels", "no blocks", "--blocks"]),
    (["eval", "--model", "raw_pixels", "--pools", "avg3x2"], ["--pools", "unknown pooling 'avg3x2'"]),
    (["eval", "--model", "raw_pixels", "--timesteps", "a,b"], ["--timesteps", "integers"]),
    (["eval", "--model", "raw_pixels", "--extra", "{not json"], ["--extra", "not valid JSON"]),
    (["eval"], ["--checkpoint", "--model"]),
    # bench
    (["bench", "--preset", "huge"], ["unknown bench preset 'huge'", "smoke"]),
    (["bench", "--methods", "ddae,byol"], ["unknown method 'byol'", "simclr"]),
    (["bench", "--dataset", "cifar1000"], ["unknown dataset 'cifar1000'"]),
    # export, reproduce
    (["export", "x.ckpt", "out", "--method", "byol"], ["unknown method 'byol'"]),
    (["reproduce", "no_such_config", "--dry-run"], ["no_such_config", "ddae_cifar10"]),
    (["reproduce"], ["name a config", "--list"]),
    (["reproduce", "simclr_cifar10", "--checkpoint-kind", "pt"], ["--checkpoint-kind", "invalid choice", "adm"]),
]


@pytest.mark.parametrize("argv, words", USAGE, ids=[" ".join(a)[:40] for a, _ in USAGE])
def test_usage_errors_exit_2_with_one_line(argv, words, capsys, tmp_path):
    code, err = run_main([*argv, "--out", str(tmp_path)] if argv[0] in ("pretrain", "bench") else argv, capsys)
    assert code == 2
    assert_one_line(err, *words)


@pytest.mark.parametrize("logger, package", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_logger_without_its_package_is_a_usage_error(logger, package, capsys, tmp_path):
    if importlib.util.find_spec(package):
        pytest.skip(f"{package} is installed here")
    code, err = run_main(["pretrain", "--logger", logger, "--out", str(tmp_path)], capsys)
    assert code == 2
    assert_one_line(err, f"pip install {package}")


def test_explicit_block_or_timestep_the_backbone_lacks_lists_what_it_has(export_dir, capsys, tmp_path):
    base = ["eval", "--checkpoint", str(export_dir), "--out", str(tmp_path)]
    code, err = run_main([*base, "--blocks", "mid,nope"], capsys)
    assert code == 2
    assert_one_line(err, "unknown block of ddae_unet", "'nope'", "mid", "up0")
    code, err = run_main([*base, "--timesteps", "0,5000"], capsys)
    assert code == 2
    assert_one_line(err, "timestep 5000", "0..999")
    assert not (tmp_path / "records.jsonl").exists()  # nothing evaluated in place of what was asked


# ---------------------------------------------------------------------------------------------- --config
def test_config_file_sets_options_and_flags_override_it(tmp_path, monkeypatch):
    import diffssl_plugin.cli as cli

    seen = {}
    monkeypatch.setitem(cli.COMMANDS, "pretrain", lambda args: seen.update(vars(args)) or 0)
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: 32\nmethod: simclr\nmethod-args: {temperature: 0.2}\nno_resume: true\n")
    assert main(["pretrain", "--config", str(config), "--batch-size", "64", "--out", str(tmp_path)]) == 0
    assert seen["batch_size"] == 64 and seen["method"] == "simclr" and seen["no_resume"]
    assert seen["method_args"] == {"temperature": 0.2}


@pytest.mark.parametrize(
    "text, words",
    [
        ("batch_size: 32\nlearning_rate: 3\n", ["unknown key 'learning_rate'", "valid keys", "batch-size"]),
        ("batch_size: 0\n", ["c.yaml", "batch_size", "positive"]),
        ("batch_size: [unclosed\n", ["c.yaml", "not valid YAML"]),
        ("- a list\n", ["c.yaml", "expected a mapping"]),
    ],
)
def test_bad_config_files(text, words, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(text)
    code, err = run_main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path)], capsys)
    assert code == 2
    assert_one_line(err, *words)
    code, err = run_main(["eval", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2
    assert_one_line(err, "no such file", "missing.yaml")


# ---------------------------------------------------------------------------------------------- runtime failures (1)
def test_truncated_export_is_a_runtime_error_naming_the_file(export_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    weights = broken / "backbone" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    code, err = run_main(["eval", "--checkpoint", str(broken), "--out", str(tmp_path)], capsys)
    assert code == 1
    assert_one_line(err, "truncated or corrupted", str(broken / "backbone"))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):  # the Python API, same error
        from diffssl_plugin.loading import load_backbone

        load_backbone(checkpoint=str(broken))


def test_leaderboard_faults(tmp_path, capsys):
    from diffssl_plugin.eval.records import make_record

    path = tmp_path / "records.jsonl"
    code, err = run_main(["leaderboard", str(path)], capsys)
    assert code == 1
    assert_one_line(err, "no records file", str(path))
    code, err = run_main(["leaderboard", str(tmp_path)], capsys)
    assert code == 1
    assert_one_line(err, "is a folder")
    path.write_text('garbage\n{"method": "x"}\n{"torn": ')
    code, err = run_main(["leaderboard", str(path)], capsys)
    assert code == 1
    assert "no usable records" in err.splitlines()[-1] and "Traceback" not in err
    assert f"{path}:1: skipped" in err and f"{path}:2: skipped" in err and "'backbone'" in err
    good = make_record(
        method="m", backbone="b", dataset="digits", split="test", protocol={"name": "linear"}, metric="acc", value=0.5
    )
    with open(path, "a") as f:
        f.write("\n" + json.dumps(good) + "\n")
    code, err = run_main(["leaderboard", str(path), "--out", str(tmp_path)], capsys)
    assert code == 0 and err.count("warning:") == 3 and "Traceback" not in err  # one line per bad line
    assert "| m | b | 50.0 |" in (tmp_path / "leaderboard.md").read_text()
    code, err = run_main(["leaderboard", str(path), "--dataset", "cifar10", "--out", str(tmp_path)], capsys)
    assert code == 1
    assert "no test-split records on dataset 'cifar10'" in err and "digits" in err
    with pytest.raises(FileFormatError, match="no records file"):
        from diffssl_plugin.eval import read_records

        read_records(tmp_path / "nope.jsonl")


def test_python_api_names_the_problem():
    from diffssl_plugin.bench import run_bench
    from diffssl_plugin.loading import load_backbone

    with pytest.raises(UnknownNameError, match="unknown timm model 'vit_nope'"):
        load_backbone(model="vit_nope")
    with pytest.raises(UnknownNameError, match="unknown bench preset 'huge'"):
        run_bench("huge")
    with pytest.raises(UnknownNameError, match="unknown method 'byol'"):
        run_bench("smoke", methods=("ddae", "byol"))


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(FileFormatError):
        main(["--debug", "leaderboard", str(tmp_path / "none.jsonl")])
    with pytest.raises(FileFormatError):
        main(["leaderboard", str(tmp_path / "none.jsonl"), "--debug"])


def test_no_traceback_and_exit_code_end_to_end(background):
    """`python -m diffssl_plugin` is `diffssl`: a runtime failure exits 1 with one line and no traceback."""
    proc, none = background["cli"]
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    assert err.strip() == (
        f"diffssl leaderboard: error: no records file at {none}; run `diffssl eval` or `diffssl bench` first"
    )


# ---------------------------------------------------------------------------------------------- caches
_SHARER = r"""
import sys, time
from pathlib import Path
import timm, torch
import diffssl_plugin
from diffssl_plugin.data import load_split
from diffssl_plugin.eval.features import extract_features

cache, who = Path(sys.argv[1]), int(sys.argv[2])
model = timm.create_model("raw_pixels", in_chans=1, img_size=28)
data = load_split("digits", "train")
subsets = [data.balanced_subset(total=100 + 10 * s, seed=s) for s in range(8)]
(cache.parent / f"ready{who}").touch()
while not all((cache.parent / f"ready{w}").exists() for w in (0, 1)):  # both start at once
    time.sleep(0.01)
checked = 0
for _ in range(2):
    for sub in subsets if who == 0 else subsets[::-1]:
        got = extract_features(model, sub, cache_dir=cache, progress=False)
        want = extract_features(model, sub, cache_dir=None, progress=False)
        assert len(got) == 1 and all(torch.equal(got[k], want[k]) for k in want), "wrong features"
        checked += 1
print("ok", checked, flush=True)
if who == 0:  # then it writes one more entry and is killed in the middle of the file (kill -9)
    import safetensors.torch as st
    from diffssl_plugin.eval.features import FeatureCache

    def half_then_hang(tensors, filename, metadata=None):
        data = st.save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        print("mid-write", flush=True)
        time.sleep(600)

    st.save_file = half_then_hang
    killed = FeatureCache(sys.argv[3])
    killed.save(killed.root / "m" / "entry.safetensors", torch.ones(1000, 64), key="k")
"""


def test_two_processes_sharing_one_feature_cache_both_get_correct_features(background):
    procs, cache, _ = background["sharers"]
    out, err = procs[1].communicate(timeout=300)
    assert procs[1].returncode == 0 and out.strip() == "ok 16", err[-2000:]
    assert procs[0].stdout.readline().strip() == "ok 16", procs[0].stderr.read()[-2000:] if procs[0].poll() else ""
    entries = list(cache.rglob("*.safetensors"))
    assert len(entries) == 8 and not list(cache.rglob("*.tmp"))  # one whole entry per subset, no leftovers


def _digits_and_model():
    import timm

    from diffssl_plugin.data import load_split

    return timm.create_model("raw_pixels", in_chans=1, img_size=28), load_split("digits", "test")


def _entry(cache_dir: Path, model, data) -> Path:
    from diffssl_plugin.eval.features import OUTPUT, FeatureCache, model_fingerprint

    return FeatureCache(cache_dir).path(model_fingerprint(model), data, OUTPUT)


@pytest.mark.parametrize("damage", ["truncated", "zero-filled", "another key", "old format"])
def test_a_torn_feature_cache_entry_is_recomputed_never_trusted(damage, tmp_path):
    from safetensors.torch import save_file

    from diffssl_plugin.eval.features import OUTPUT, extract_features

    model, data = _digits_and_model()
    want = extract_features(model, data, progress=False)[OUTPUT]
    extract_features(model, data, cache_dir=tmp_path, progress=False)
    entry = _entry(tmp_path, model, data)
    raw = entry.read_bytes()
    if damage == "truncated":  # disk full, or a copy cut short
        entry.write_bytes(raw[: len(raw) * 2 // 3])
    elif damage == "zero-filled":  # a power cut after the rename, before the data reached the disk
        header = 8 + int.from_bytes(raw[:8], "little")
        entry.write_bytes(raw[:header] + bytes(len(raw) - header))
    elif damage == "another key":  # an entry copied between caches under the wrong name
        other = data.balanced_subset(total=len(data) // 2, seed=1)
        extract_features(model, other, cache_dir=tmp_path, progress=False)
        entry.write_bytes(_entry(tmp_path, model, other).read_bytes())
    else:  # written before entries carried their key and checksum
        save_file({"features": torch.zeros_like(want)}, str(entry))
    with pytest.warns(UserWarning, match="recomputing"):
        got = extract_features(model, data, cache_dir=tmp_path, progress=False)[OUTPUT]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(extract_features(model, data, cache_dir=tmp_path, progress=False)[OUTPUT], want)


def test_a_writer_killed_mid_write_leaves_nothing_trusted(background):
    from diffssl_plugin.eval.features import FeatureCache

    proc, root = background["sharers"][0][0], background["sharers"][2]
    try:
        assert proc.stdout.readline().strip() == "mid-write"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    folder = root / "m"
    assert not (folder / "entry.safetensors").exists()  # the entry never appeared: nothing to trust
    (leftover,) = folder.glob(".entry.safetensors.*.tmp")
    cache = FeatureCache(root)
    assert cache.load(folder / "entry.safetensors", key="k") is None
    old = time.time() - 2 * FeatureCache.STALE_SECONDS
    os.utime(leftover, (old, old))
    cache.save(folder / "other.safetensors", torch.zeros(3, 2), key="other")  # a later writer sweeps it away
    assert not leftover.exists()
    torch.testing.assert_close(cache.load(folder / "other.safetensors", key="other"), torch.zeros(3, 2))
