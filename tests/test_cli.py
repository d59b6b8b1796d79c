"""The `diffssl` command end to end, and the errors it gives for bad input."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import TINY_UNET

from diffssl_plugin.cli import main


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffssl_plugin.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        check=False,
    )


@pytest.mark.slow
def test_bench_smoke_end_to_end(tmp_path, capsys):
    """The main job's code path: pretrain a diffusion learner and a baseline, evaluate them and the raw pixels with
    every protocol, write the leaderboard and pictures (the other learners' training and evaluation are tested in
    test_lightly_tooling, test_resume and their own files; all six here took over two minutes of CI)."""
    out = tmp_path / "bench"
    proc = run_cli("bench", "--preset", "smoke", "--methods", "ddae,simclr", "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| raw_pixels |" in proc.stdout and "| ddae |" in proc.stdout
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    ddae = [r for r in records if r["method"] == "ddae" and r["protocol"]["name"] == "linear"]
    assert len(ddae) == 1 and ddae[0]["budget"]["steps"] == 15 and ddae[0]["readout"]["block"]
    assert ddae[0]["checkpoint_hash"] and ddae[0]["versions"]["diffusers"]
    for name in (
        "leaderboard.md",
        "leaderboard.csv",
        "samples_ddae.png",
        "sweep_ddae_unet_fmnist.png",
        "segmentation_best.png",
    ):
        assert (out / name).stat().st_size > 0, name
    # every learner has a number in each evaluation family of the leaderboard
    header = (out / "leaderboard.md").read_text().splitlines()[0]
    for title in (
        "linear",
        "kNN k=20",
        "fine-tune",
        "0.2% linear",
        "0.2% fine-tune",
        "→ MNIST-5k",
        "→ digits",
        "→ FMNIST tops",
        "seg. mIoU (linear)",
        "seg. mIoU (MLP)",
    ):
        assert f" {title} |" in header, title
    names = {r["protocol"]["name"] for r in records if r["method"] == "simclr" and r["split"] == "test"}
    assert {"semisup0.2_linear", "semisup0.2_ft", "transfer_digits", "segmentation", "segmentation_mlp"} <= names
    # the exported checkpoint evaluates again through `diffssl eval`, from the cached features (in this process:
    # the command line itself ran above, and each fresh interpreter costs ~10 s of imports)
    args = ["--timesteps", "0", "--blocks", "mid", "--pools", "avg", "--train-images", "300", "--no-progress"]
    capsys.readouterr()
    code = main(["eval", "--checkpoint", str(out / "ddae" / "export"), *args, "--out", str(tmp_path / "eval")])
    assert code == 0 and "ddae_unet_fmnist" in capsys.readouterr().out
    # leaderboard re-renders from records alone
    assert main(["leaderboard", str(out / "records.jsonl"), "--out", str(tmp_path / "lb")]) == 0
    assert (tmp_path / "lb" / "leaderboard.md").read_text() == capsys.readouterr().out.strip() + "\n"


def test_unknown_method_dataset_and_protocol(capsys, tmp_path):
    assert main(["pretrain", "--method", "byol", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "unknown method 'byol'" in capsys.readouterr().err
    assert main(["pretrain", "--dataset", "imagenet-z", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'imagenet-z'" in err and "fashion_mnist" in err
    assert main(["eval", "--model", "raw_pixels", "--protocol", "nope", "--out", str(tmp_path)]) == 2
    assert "valid protocols" in capsys.readouterr().err


def test_bad_budget_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--budget", "forever"])
    assert "cannot read budget" in capsys.readouterr().err


def test_eval_rejects_missing_or_non_export_checkpoint(capsys, tmp_path):
    assert main(["eval", "--checkpoint", str(tmp_path / "nowhere")]) == 1  # a runtime failure, not usage
    assert "not an exported backbone folder" in capsys.readouterr().err


def test_eval_rejects_weights_that_do_not_fit(capsys, tmp_path):
    from diffssl_plugin.io import save_safetensors

    path = save_safetensors({"head.weight": torch.zeros(3, 3)}, tmp_path / "w.safetensors")
    assert main(["eval", "--model", "raw_pixels", "--weights", str(path), "--out", str(tmp_path)]) == 1
    assert "does not fit raw_pixels" in capsys.readouterr().err


class Payload:  # unpickling this would need code: a stand-in for an untrusted checkpoint
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "truncated or corrupted"),
        (b"PK\x03\x04garbage" * 10, "truncated or corrupted"),
        (pickle.dumps({"state_dict": Payload()}), "refusing to load"),
    ],
)
def test_export_refuses_bad_checkpoints(capsys, tmp_path, content, message):
    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    assert main(["export", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and "last.ckpt" in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_export_round_trip_from_a_training_checkpoint(tmp_path, capsys):
    import timm

    from diffssl_plugin.methods.training import Budget, pretrain

    tiny = {**TINY_UNET, "sample_size": 28, "add_attention": False}
    pretrain(
        "ddae",
        budget=Budget(steps=2),
        out_dir=tmp_path / "run",
        batch_size=16,
        max_images=100,
        progress=False,
        logger=False,
        method_kwargs={"unet_config": tiny},
    )
    assert main(["export", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), str(tmp_path / "exp")]) == 0
    a = timm.create_model(f"local-dir:{tmp_path / 'exp' / 'backbone'}", pretrained=True)
    b = timm.create_model(f"local-dir:{tmp_path / 'run' / 'export' / 'backbone'}", pretrained=True)
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(a(x), b(x))


def test_trainer_options_reach_pretrain(tmp_path, monkeypatch, capsys):
    """--sync-batchnorm reaches the Runtime, --accumulate-grad-batches and --logger reach pretrain(); an
    accumulation of 1 is not passed at all (pretrain without the parameter still works)."""
    import pytorch_lightning as pl

    import diffssl_plugin.methods.training as training
    from diffssl_plugin.runtime import current

    seen = []

    class Result:
        def as_record(self):
            return {"ok": True}

    def fake_pretrain(*args, **kwargs):
        seen.append((kwargs, current()))
        return Result()

    monkeypatch.setattr(training, "pretrain", fake_pretrain)
    out = str(tmp_path)
    assert main(["pretrain", "--out", out, "--sync-batchnorm", "--accumulate-grad-batches", "4"]) == 0
    assert main(["pretrain", "--out", out, "--method", "simclr", "--batch-size", "32"]) == 0
    (first, rt1), (second, rt2) = seen
    assert rt1.sync_batchnorm and not rt2.sync_batchnorm
    assert first["accumulate_grad_batches"] == 4 and "accumulate_grad_batches" not in second
    assert isinstance(first["logger"], pl.loggers.CSVLogger) and second["batch_size"] == 32
    assert json.loads(capsys.readouterr().out.split("}")[0] + "}") == {"ok": True}


def test_every_option_has_help_with_its_default(capsys):
    from diffssl_plugin.cli import build_parser

    parser = build_parser()
    for name, sub in parser.subcommands.items():
        for action in sub._actions:
            assert action.help, (name, action.dest)
    for name in ("pretrain", "eval"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for option in ("--dataset", "--out", "--num-nodes", "--precision"):
            assert option in text
        assert "(default: fashion_mnist)" in text and "(default: auto)" in text and "(default: 1)" in text
