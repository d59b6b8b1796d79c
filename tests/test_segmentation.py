"""Segmentation: the Fashion-MNIST scene generator, mIoU, dense features (tiling), both protocols, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

import diffssl_plugin  # noqa: F401
from diffssl_plugin.data import compose_scenes, load_segmentation
from diffssl_plugin.data.scenes import SegmentationSet
from diffssl_plugin.errors import DatasetNotFoundError, InputError, UnknownNameError
from diffssl_plugin.eval import EvalConfig, EvalContext, evaluate
from diffssl_plugin.eval.segmentation import segmentation_settings
from diffssl_plugin.eval.segmentation_features import dense_features, dense_spec, feature_model
from diffssl_plugin.eval.segmentation_heads import IoUMeter, mean_iou

TINY = {
    "train_images": 24,
    "val_images": 8,
    "test_images": 8,
    "head_epochs": 3,
    "head_lr": 0.03,
    "mlp_pixels": 3000,
    "mlp_epochs": 1,
    "mlp_members": 3,
    "pictures": 2,
}


# ---------------------------------------------------------------------------------------------- scenes
def test_scene_labels_match_their_pixels(fmnist_uint8):
    from diffssl_plugin.data import load_split

    labels = load_split("fashion_mnist", "test", download=False).labels[:64]
    images, masks, layout = compose_scenes(
        fmnist_uint8, labels, 30, canvas=56, items_per_scene=(2, 4), threshold=32, seed=3
    )
    assert images.shape == (30, 1, 56, 56) and masks.shape == (30, 56, 56)
    assert images.dtype == masks.dtype == torch.uint8
    for n in range(30):
        # for every pixel, the topmost item whose pixel is on there (reference: paste the boxes one by one)
        owner = np.full((56, 56), -1)
        value = np.zeros((56, 56), dtype=np.uint8)
        for k in range(4):
            i = int(layout.items[n, k])
            if i < 0:
                continue
            top, left = int(layout.top[n, k]), int(layout.left[n, k])
            item = fmnist_uint8[i, 0].numpy()
            on = item >= 32
            owner[top : top + 28, left : left + 28][on] = i
            value[top : top + 28, left : left + 28][on] = item[on]
        expected = np.where(owner >= 0, labels.numpy()[np.maximum(owner, 0)] + 1, 0)
        np.testing.assert_array_equal(masks[n].numpy(), expected)
        np.testing.assert_array_equal(images[n, 0].numpy(), value)
    on = images[:, 0] > 0
    assert torch.equal(on, masks > 0)  # labelled exactly where something is drawn
    assert (images[:, 0][masks > 0] >= 32).all()  # ... and only with on pixels
    assert 2 <= int((layout.items >= 0).sum(1).min()) and int((layout.items >= 0).sum(1).max()) <= 4


def test_later_items_cover_earlier_ones_and_faint_pixels_are_not_drawn():
    full = torch.full((1, 28, 28), 200, dtype=torch.uint8)  # class 3: on everywhere
    half = torch.zeros((1, 28, 28), dtype=torch.uint8)
    half[:, :, :14] = 100  # class 5: on in the left half
    half[:, :, 14:] = 20  # faint (below the threshold 32): never drawn
    items = torch.stack([full, half])
    images, masks, layout = compose_scenes(items, torch.tensor([3, 5]), 40, canvas=28, items_per_scene=(2, 2), seed=0)
    seen = set()
    for n in range(40):
        order = tuple(layout.items[n].tolist())
        seen.add(order)
        if order == (0, 1):  # the half item drawn last: it wins on its left half only
            assert (masks[n, :, :14] == 6).all() and (masks[n, :, 14:] == 4).all()
            assert (images[n, 0, :, :14] == 100).all() and (images[n, 0, :, 14:] == 200).all()
        elif order == (1, 0):  # the full item drawn last covers everything
            assert (masks[n] == 4).all() and (images[n] == 200).all()
        elif order == (1, 1):  # only the faint-right item: its right half is background
            assert (masks[n, :, :14] == 6).all() and (masks[n, :, 14:] == 0).all()
            assert (images[n, 0, :, 14:] == 0).all()
    assert {(0, 1), (1, 0)} <= seen


def test_scenes_are_fixed_by_seed_and_split():
    a = load_segmentation("fashion_scenes", "train", num_images=20, seed=0)
    b = load_segmentation("fashion_scenes", "train", num_images=20, seed=0)
    c = load_segmentation("fashion_scenes", "train", num_images=20, seed=1)
    t = load_segmentation("fashion_scenes", "test", num_images=20, seed=0)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, c.images) and not torch.equal(a.images, t.images)
    assert a.class_names[0] == "background" and a.num_classes == 11 and a.ignore_index == 255
    assert a.images.shape == (20, 1, 56, 56) and a.meta["canvas"] == 56
    assert a.split == "train" and t.split == "test"


# ---------------------------------------------------------------------------------------------- mIoU
def test_miou_equals_a_hand_computation():
    preds = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 1]])
    target = torch.tensor([[0, 0, 1, 255], [0, 1, 2, 2]])
    # class 0: prediction and truth agree on 3 pixels, union 3 → 1
    # class 1: predicted at (0,2), (1,3) (the (0,3) pixel is ignored), true at (0,2), (1,1): 1 / 3
    # class 2: predicted at (1,1), (1,2), true at (1,2), (1,3): 1 / 3
    # class 3: in neither → left out of the mean
    expected = (1 + 1 / 3 + 1 / 3) / 3
    assert mean_iou(preds, target, num_classes=4) == pytest.approx(expected, abs=1e-6)
    meter = IoUMeter(4)
    meter.update(preds[:1], target[:1])  # accumulated over batches: a dataset-level confusion matrix
    meter.update(preds[1:], target[1:])
    assert meter.miou() == pytest.approx(expected, abs=1e-6)
    assert meter.class_iou() == [
        pytest.approx(1.0),
        pytest.approx(1 / 3, abs=1e-5),
        pytest.approx(1 / 3, abs=1e-5),
        None,
    ]
    with pytest.raises(InputError):
        meter.update(torch.tensor([[7]]), torch.tensor([[0]]))


# ---------------------------------------------------------------------------------------------- features
def _ctx(model, extra=None, **kw) -> EvalContext:
    return EvalContext(
        model, "m", "m", EvalConfig(extra={"segmentation": {**TINY, **(extra or {})}}), progress=False, **kw
    )


@pytest.mark.parametrize("size", [56, 60])
def test_tiles_are_stitched_back_in_place(size):
    raw = timm.create_model("raw_pixels", num_classes=0)
    ctx = _ctx(raw, {"feature_stride": 1})
    spec = dense_spec(ctx, segmentation_settings(ctx))
    x = torch.rand(3, 1, size, size)
    f = dense_features(raw, spec, x)  # raw pixels (mean 0, std 1) at stride 1: the image itself
    torch.testing.assert_close(f, x)


class PaddedIdentity(nn.Module):
    """Pads 28 → 32 inside, like MDSM's network, and returns the padded image as its only map."""

    img_size, net_size = 28, 32

    def __init__(self):
        super().__init__()
        self.pretrained_cfg = {"input_size": (1, 28, 28), "mean": (0.0,), "std": (1.0,), "num_classes": 0}
        self.feature_info = [{"num_chs": 1, "reduction": 1, "module": "padded"}]

    def forward_intermediates(self, x, indices=None, intermediates_only=False, **kw):
        maps = [torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)]
        return maps if intermediates_only else (x, maps)


def test_maps_of_backbones_that_pad_inside_are_cropped_to_the_image():
    model = PaddedIdentity()
    ctx = _ctx(model, {"feature_stride": 1})
    x = torch.rand(2, 1, 56, 56)
    torch.testing.assert_close(dense_features(model, dense_spec(ctx, segmentation_settings(ctx)), x), x)
    ebm = timm.create_model("mdsm_ebm_fmnist", num_classes=0, width=8).eval()
    ctx = _ctx(ebm, {"indices": 2})
    assert dense_features(ebm, dense_spec(ctx, segmentation_settings(ctx)), x).shape == (2, 32 + 64, 14, 14)


def test_fixed_size_vit_reads_a_scene_as_tiles():
    vit = timm.create_model("mae_vit_tiny_p4", num_classes=0, depth=2).eval()
    ctx = _ctx(vit, {"indices": 2})
    spec = dense_spec(ctx, segmentation_settings(ctx))
    assert spec.tile == 28 and len(spec.maps) == 2
    f = dense_features(vit, spec, torch.rand(2, 1, 56, 56))
    assert f.shape == (2, 2 * 192, 14, 14)
    whole = _ctx(vit, {"input": "full"})
    with pytest.raises(InputError, match="input='tile'"):  # its 7×7 position embeddings fix the size
        dense_features(vit, dense_spec(whole, segmentation_settings(whole)), torch.rand(1, 1, 56, 56))


def test_convolutional_backbones_can_read_whole_scenes():
    ddae = timm.create_model("ddae_unet_fmnist", num_classes=0).eval()
    ctx = _ctx(ddae, {"input": "full", "timesteps": (10,), "blocks": ("up0",)})
    spec = dense_spec(ctx, segmentation_settings(ctx))
    model = feature_model(ddae, spec)  # switched to dynamic_img_size, sharing the U-Net
    assert model.unet is ddae.unet
    assert dense_features(model, spec, torch.rand(2, 1, 56, 56)).shape == (2, 2 * 64, 14, 14)


def test_diffusion_backbone_features_include_the_readout_block():
    ddae = timm.create_model("ddae_unet_fmnist", num_classes=0).eval()
    ctx = _ctx(ddae, {"timesteps": (10, 50), "blocks": ("up0", "up1")})
    spec = dense_spec(ctx, segmentation_settings(ctx))
    assert spec.names == ("up0@t10", "up1@t10", "up0@t50", "up1@t50", "mid@t10")  # mid @ t=10: its own readout
    f = dense_features(ddae, spec, torch.rand(2, 1, 56, 56))
    assert f.shape == (2, 5 * 64, 14, 14) and torch.isfinite(f).all()


# ---------------------------------------------------------------------------------------------- protocols
class RandomFeatures(nn.Module):
    """A backbone whose dense features are noise, unrelated to the image."""

    def __init__(self):
        super().__init__()
        self.pretrained_cfg = {"input_size": (1, 28, 28), "mean": (0.0,), "std": (1.0,), "num_classes": 0}
        self.feature_info = [{"num_chs": 8, "reduction": 1, "module": "noise"}]
        self.gen = torch.Generator().manual_seed(0)

    def forward_intermediates(self, x, indices=None, intermediates_only=False, **kw):
        maps = [torch.randn(x.shape[0], 8, *x.shape[-2:], generator=self.gen)]
        return maps if intermediates_only else (x, maps)


@pytest.mark.parametrize("name", ["raw_pixels", "ddae_unet_fmnist"])
def test_both_protocols_write_records_and_pictures(tmp_path, name):
    model = timm.create_model(name, num_classes=0)
    config = EvalConfig(train_images=50, val_images=20, test_images=20, extra={"segmentation": TINY})
    records = evaluate(
        model,
        name,
        name,
        config,
        protocols=("segmentation", "segmentation_mlp"),
        cache_dir=tmp_path / "cache",
        out_dir=tmp_path,
        progress=False,
    )
    assert [r["protocol"]["name"] for r in records] == ["segmentation", "segmentation_mlp"]
    for r in records:
        assert r["metric"] == "miou" and r["dataset"] == "fashion_scenes" and r["split"] == "test"
        assert 0.0 <= r["value"] <= 1.0
        assert r["scenes"] == {"train": 24, "val": 8, "test": 8}
        assert set(r["per_class_iou"]) == {
            "background",
            *load_segmentation("fashion_scenes", "test", num_images=1).class_names[1:],
        }
    assert records[0]["val_miou"] is not None and len(records[0]["protocol"]["val_curve"]) == 3
    assert (tmp_path / f"segmentation_{name}.png").stat().st_size > 0
    assert (tmp_path / f"segmentation_mlp_{name}.png").stat().st_size > 0
    # the second protocol read the features the first one cached: one file per split
    assert len(list((tmp_path / "cache" / "segmentation").rglob("*.npy"))) == 3


def test_raw_pixels_score_clearly_above_random_features():
    # enough steps (150) for the head to find the intensity threshold between background and items
    extra = {**TINY, "train_images": 40, "val_images": 20, "test_images": 40, "head_epochs": 15, "head_batch_size": 4}
    config = EvalConfig(train_images=50, val_images=20, test_images=20, extra={"segmentation": extra})
    scores = {}
    for name, model in (("raw", timm.create_model("raw_pixels", num_classes=0)), ("random", RandomFeatures())):
        scores[name] = evaluate(model, name, name, config, protocols=("segmentation",), progress=False)[0]["value"]
    # random features can at best predict the prior (background, ~74% of pixels: 0.74 / 11 ≈ 0.067); a pixel's
    # intensity separates the items from the background (IoU ≈ 0.9, i.e. +0.08 / 11) but hardly their classes
    assert scores["random"] < 0.075
    assert scores["raw"] > scores["random"] + 0.02


# ---------------------------------------------------------------------------------------------- bad input
def test_unknown_dataset_and_missing_data_are_named(tmp_path):
    with pytest.raises(UnknownNameError, match="nope.*fashion_scenes"):
        load_segmentation("nope", "train")
    missing = tmp_path / "no_voc_here"
    with pytest.raises(DatasetNotFoundError, match="VOCtrainval") as e:
        load_segmentation("voc", "train", root=missing)
    assert str(missing) in str(e.value)
    with pytest.raises(DatasetNotFoundError, match="ADEChallengeData2016.zip"):
        load_segmentation("ade20k", "test", root=missing)
    ctx = _ctx(timm.create_model("raw_pixels", num_classes=0), {"head_epochz": 3})
    with pytest.raises(InputError, match="head_epochz"):
        segmentation_settings(ctx)
    with pytest.raises(InputError):
        SegmentationSet("x", "train", torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8), ("a",))


def _write_pair(img_path, mask_path, mask: np.ndarray):
    from PIL import Image

    img_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*mask.shape, 3), 120, dtype=np.uint8)).save(img_path)
    Image.fromarray(mask.astype(np.uint8)).save(mask_path)


def test_ade20k_and_voc_folders_load_resized(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[:, 15:] = 3  # ADE class 3 → our class 2; ADE 0 ("other") → ignored
    for official, n in (("training", 4), ("validation", 2)):
        for i in range(n):
            stem = f"ADE_{official}_{i:08d}"
            _write_pair(ade / "images" / official / f"{stem}.jpg", ade / "annotations" / official / f"{stem}.png", mask)
    test = load_segmentation("ade20k", "test", root=tmp_path, size=16)
    assert test.images.shape == (2, 3, 16, 16) and test.masks.shape == (2, 16, 16)
    assert set(test.masks.unique().tolist()) == {2, 255} and test.num_classes == 150
    assert len(load_segmentation("ade20k", "train", root=tmp_path, size=16)) == 3  # 10% of 4 is val
    assert len(load_segmentation("ade20k", "val", root=tmp_path, size=16)) == 1

    voc = tmp_path / "VOCdevkit" / "VOC2012"
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[5:10] = 255
    mask[10:] = 15  # person
    names = {"train": ["a", "b"], "val": ["c"]}
    for official, stems in names.items():
        for s in stems:
            _write_pair(voc / "JPEGImages" / f"{s}.jpg", voc / "SegmentationClass" / f"{s}.png", mask)
        (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (voc / "ImageSets" / "Segmentation" / f"{official}.txt").write_text("\n".join(stems) + "\n")
    got = load_segmentation("voc", "test", root=tmp_path, size=24)
    assert got.images.shape == (1, 3, 24, 24) and set(got.masks.unique().tolist()) == {0, 15, 255}
    assert got.class_names[15] == "person" and got.num_classes == 21
