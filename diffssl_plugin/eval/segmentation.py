"""Segmentation protocols on frozen dense features: ``segmentation`` (BatchNorm + 1×1 conv, the linear
protocol) and ``segmentation_mlp`` (DDPM-seg's pixel-MLP ensemble). Both score mIoU with torchmetrics'
``MulticlassJaccardIndex(average="macro", ignore_index=255)`` (a dataset-level confusion matrix; classes
absent from both truth and prediction are left out of the mean) on the test split of a
:func:`~diffssl_plugin.data.load_segmentation` set (default ``fashion_scenes``).

**Dense features** (shared by both protocols). For a diffusion backbone (one with ``extract`` and spatial
``block_shapes``, i.e. the DDAE U-Nets) they are the maps of ``blocks`` at each of ``timesteps`` (one U-Net
forward per timestep) plus the block and timestep the ``linear`` sweep chose (else the backbone's own), as
DDPM-seg concatenates several decoder blocks at several noise levels. DDPM-seg reads ADM's decoder blocks
5–8 and 12 (the end of the 1/16 level through the 1/4 level of a 256² image) at t = 50, 150, 250; our 28×28
U-Net has three levels (7, 14, 28), so its analogues are the decoder outputs ``up0`` (7→14) and ``up1``
(14→28), and the noise levels are scaled down (t = 10, 50 by default: at 28×28 each pixel carries more of the
image than at 256², and DDAE reads t ≈ 10 at 32×32). Any other backbone gives its last ``indices``
``forward_intermediates`` maps (timm's contract). Maps are bilinearly resized to one grid, one cell per
``feature_stride`` pixels (default 4: 14×14 for a 56×56 scene, 7×7 per 28×28 tile), and concatenated along
channels. Stride 4 scored the same as stride 2 on ``fashion_scenes`` (DDAE, 200 pretraining steps: linear
0.177 vs 0.177, MLP 0.169 vs 0.171) at a quarter of the disk and ~40% less time.

**Input size.** Our backbones were trained on 28×28 images and several refuse any other size (the MAE ViT's
7×7 position embeddings, the DRL and MDSM size checks). With ``input="tile"`` (default) a scene is cut into
tiles of the backbone's input size (zero-padded at the bottom/right if it does not divide), every tile is read
as an image of its own, and the tiles' maps are stitched back; every backbone then sees inputs like its
training images, and no position embedding is resampled. The cost: no receptive field crosses a tile border.
``input="full"`` reads the whole scene at once (convolutional backbones that accept the size; a DDAE U-Net is
switched to ``dynamic_img_size``). MDSM's network pads 28→32 inside, so its maps are cropped to the image.

**Memory.** Features are written once per split to a float16 ``.npy`` file read through ``np.memmap``
(``cache_dir/segmentation/<model hash>/``, reused by the other protocol and later runs; a temporary folder
if there is no cache dir) and read back a batch at a time, so RAM never holds images × width × H × W. The
disk cost is N × D × (H/stride) × (W/stride) × 2 bytes, e.g. 500 scenes (200 + 100 + 200) × 320 channels
(the DDAE default) × 14 × 14 ≈ 60 MB; RAM holds one batch of it (as float32) at a time.
The MLP trains on a fixed number of sampled pixels (``mlp_pixels``), not on all of them.

**``segmentation`` recipe** (DINOv2's ``BNHead``, "linear"): ``BatchNorm2d`` then a 1×1 conv on the
concatenated maps, logits bilinearly upsampled to the mask size, cross-entropy with ``ignore_index``;
the 1×1 conv starts at zero weights and a log-prior bias (it predicts the train pixels' class frequencies,
so no run ends below that floor); AdamW (lr 0.03, weight decay 1e-4), cosine schedule, batches of 8 scenes,
``head_epochs`` epochs; the epoch with the best validation mIoU is scored once on test. DINOv2 trains its
head for 40k iterations; on CPU we have a few hundred, hence the large learning rate (lr 1e-3 left the head
far from converged: mIoU 0.13 vs 0.15 after 70 steps, and raw pixels stayed below the prior).

**``segmentation_mlp`` recipe** (DDPM-seg ``pixel_classifier.py``): an ensemble of ``mlp_members`` MLPs
Linear(D, 128)–ReLU–BN–Linear(128, 32)–ReLU–BN–Linear(32, C) (DDPM-seg's sizes for fewer than 30 classes),
weights N(0, 0.02), Adam, each member with its own initialisation and pixel order; the prediction is
the mode of the members' argmax (DDPM-seg), or the argmax of their mean softmax (``mlp_vote="mean"``).
Scaled down for the CPU (DDPM-seg: 10 members on every pixel of 20–50 images, batch 64, up to 100 epochs with
early stopping): ``mlp_pixels`` pixels sampled uniformly from the train scenes' labelled pixels (features
bilinearly upsampled to the pixel, as DDPM-seg upsamples to the image size), batch 256 with lr 2e-3
(DDPM-seg: 1e-3 at batch 64; square-root scaling), ``mlp_epochs`` epochs, no validation-based stopping.
Inputs are standardised per channel with the sampled pixels' mean and std (DDPM-seg feeds raw activations
of one network; ours range from raw pixels to U-Net activations).
Prediction applies the first layer at feature resolution and upsamples its output, which is exactly the same
as upsampling the features first (bilinear interpolation and the standardisation are affine with weights
summing to one) and stride² times cheaper for that, the largest, layer.

Both heads train through :func:`diffssl_plugin.supervised.fit` (the command's devices; DDP). The linear head's
loss is summed over the pixels that count and divided by their number over the whole global batch, so several
GPU processes take the one-process steps (on CPUs each process normalises with its own scenes' BatchNorm
statistics: torch synchronises BatchNorm on GPUs only).

Settings: ``EvalConfig.extra["segmentation"]`` overrides :data:`SEGMENTATION_DEFAULTS` key by key (both
protocols read it). Each run writes ``segmentation_<backbone>.png`` (``segmentation_mlp_<backbone>.png``) into
the output folder: input, truth and prediction for a few test scenes.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.scenes import SegmentationSet, load_segmentation
from ..errors import InputError
from ..io import atomic_path
from .features import Readout
from .harness import EvalContext, register_protocol
from .segmentation_features import DenseSpec, cache_dense_features, dense_spec, feature_folder, feature_model
from .segmentation_heads import (
    IoUMeter,
    evaluate_head,
    predict_mlp,
    sample_pixels,
    train_linear_head,
    train_mlp_ensemble,
)

logger = logging.getLogger(__name__)

#: settings of both protocols; ``EvalConfig.extra["segmentation"]`` overrides them key by key
SEGMENTATION_DEFAULTS: dict = {
    "dataset": "fashion_scenes",
    "dataset_kwargs": {},
    "train_images": 200,
    "val_images": 100,
    "test_images": 200,
    "input": "tile",
    "feature_stride": 4,
    "timesteps": (10, 50),
    "blocks": ("up0", "up1"),
    "add_readout": True,  # diffusion backbones (extract)
    "indices": 3,  # other backbones: the last n forward_intermediates maps (or a list of indices)
    "batch_size": 32,
    "amp": True,
    "head_epochs": 20,
    "head_lr": 0.03,
    "head_weight_decay": 1e-4,
    "head_batch_size": 8,
    "mlp_members": 10,
    "mlp_hidden": (128, 32),
    "mlp_pixels": 40000,
    "mlp_epochs": 4,
    "mlp_batch_size": 256,
    "mlp_lr": 2e-3,
    "mlp_vote": "mode",
    "pictures": 4,
}


def segmentation_settings(ctx: EvalContext) -> dict:
    """:data:`SEGMENTATION_DEFAULTS` with ``ctx.config.extra["segmentation"]`` applied; unknown keys raise."""
    given = dict((ctx.config.extra or {}).get("segmentation", {}))
    unknown = set(given) - set(SEGMENTATION_DEFAULTS)
    if unknown:
        raise InputError(f"unknown segmentation settings {sorted(unknown)}; valid: {', '.join(SEGMENTATION_DEFAULTS)}")
    settings = {**SEGMENTATION_DEFAULTS, **given}
    if settings["input"] not in ("tile", "full"):
        raise InputError(f"segmentation input must be 'tile' or 'full', got {settings['input']!r}")
    if settings["mlp_vote"] not in ("mode", "mean"):
        raise InputError(f"mlp_vote must be 'mode' or 'mean', got {settings['mlp_vote']!r}")
    return settings


# ---------------------------------------------------------------------------------------------- picture
def plot_segmentation(
    images: torch.Tensor,
    masks: torch.Tensor,
    preds: torch.Tensor,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
    ignore_index: int = 255,
) -> Path:
    """Rows of (input, truth, prediction) with a class legend; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    k = len(class_names)
    base = plt.get_cmap("tab10" if k <= 11 else "tab20" if k <= 21 else "gist_ncar")
    colours = [(0.0, 0.0, 0.0, 1.0)] + [base(i % base.N if k <= 21 else i / max(1, k - 1)) for i in range(k - 1)]
    cmap = ListedColormap([*colours, (1.0, 1.0, 1.0, 1.0)])  # the last colour: ignored pixels

    def colour(m: torch.Tensor) -> np.ndarray:
        m = m.long().clone()
        m[m == ignore_index] = k
        return m.numpy()

    n = len(preds)
    height = 2.2 * n + 0.9
    fig, axes = plt.subplots(n, 3, figsize=(6.6, height), squeeze=False)
    for i in range(n):
        img = images[i].float().div(255.0)
        axes[i, 0].imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
        axes[i, 1].imshow(colour(masks[i]), cmap=cmap, vmin=0, vmax=k, interpolation="nearest")
        axes[i, 2].imshow(colour(preds[i]), cmap=cmap, vmin=0, vmax=k, interpolation="nearest")
        for j, name in enumerate(("input", "truth", "prediction")):
            axes[i, j].set_axis_off()
            if i == 0:
                axes[i, j].set_title(name)
    if k <= 21:
        fig.legend(
            handles=[Patch(color=colours[c], label=class_names[c]) for c in range(k)],
            loc="lower center",
            ncol=4,
            fontsize=7,
            frameon=False,
        )
    fig.suptitle(title, fontsize=9)
    legend_rows = math.ceil(k / 4) if k <= 21 else 0
    fig.tight_layout(rect=(0, min(0.4, 0.2 * legend_rows / height), 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def _picture_path(ctx: EvalContext, prefix: str) -> Path | None:
    if not ctx.writes_files:  # no output folder, or not rank 0
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", ctx.backbone_name).strip("_") or "backbone"
    return Path(ctx.out_dir) / f"{prefix}_{safe}.png"


# ---------------------------------------------------------------------------------------------- protocols
def _load(settings: dict, ctx: EvalContext) -> tuple[SegmentationSet, SegmentationSet, SegmentationSet]:
    name, kw = settings["dataset"], dict(settings["dataset_kwargs"])
    kw.setdefault("seed", ctx.config.seed)
    return tuple(
        load_segmentation(name, split, root=ctx.config.data_root, num_images=settings[f"{split}_images"], **kw)
        for split in ("train", "val", "test")
    )


def _prepare(ctx: EvalContext, settings: dict, folder: Path):
    """Scenes, feature spec and the three feature stores."""
    splits = _load(settings, ctx)
    spec = dense_spec(ctx, settings)
    model = feature_model(ctx.model, spec)
    started = time.perf_counter()
    stores = [
        cache_dense_features(ctx, spec, d, folder, settings["batch_size"], settings["amp"], model) for d in splits
    ]
    return splits, spec, stores, time.perf_counter() - started


def _readout(spec: DenseSpec) -> Readout:
    """The record's readout: every map read, un-pooled (their timesteps are in the names)."""
    return Readout(None, "+".join(spec.names), "none")


def _protocol_fields(spec: DenseSpec, settings: dict, stores) -> dict:
    return {
        "dataset": settings["dataset"],
        "features": list(spec.names),
        "feature_dim": stores[0].dim,
        "feature_grid": list(stores[0].array.shape[-2:]),
        "input": spec.input,
        "tile": spec.tile,
        "feature_stride": spec.stride,
    }


def _plot(ctx: EvalContext, prefix: str, test: SegmentationSet, preds: torch.Tensor, head: str, miou: float):
    """Draw the first test scenes with their predictions (when the run writes files); the picture's path."""
    picture = _picture_path(ctx, prefix)
    if picture is not None and len(preds):
        n, title = len(preds), f"{ctx.method} ({ctx.backbone_name}): {head}, test mIoU {100 * miou:.1f}%"
        plot_segmentation(test.images[:n], test.masks[:n], preds, test.class_names, picture, title)
    return picture


def _test_record(
    ctx: EvalContext,
    settings: dict,
    spec: DenseSpec,
    sets: tuple[SegmentationSet, SegmentationSet, SegmentationSet],
    meter: IoUMeter,
    picture: Path | None,
    protocol: dict,
    cost: dict,
    started: float,
    **extra,
) -> dict:
    """The test mIoU record of a segmentation protocol; ``cost`` adds to the feature cache size and time
    (``feature_cache_mb``, ``feature_seconds``), ``extra`` to the record's fields."""
    train, val, test = sets
    return ctx.record(
        split="test",
        protocol=protocol,
        value=meter.miou(),
        metric="miou",
        dataset=settings["dataset"],
        readout=_readout(spec),
        **extra,
        per_class_iou=dict(zip(test.class_names, meter.class_iou())),
        scenes={"train": len(train), "val": len(val), "test": len(test)},
        picture=str(picture) if picture else None,
        cost={**cost, "wall_seconds": round(time.perf_counter() - started, 2)},
    )


@register_protocol("segmentation")
def segmentation_protocol(ctx: EvalContext) -> list[dict]:
    """BatchNorm + 1×1 conv on frozen dense features (the linear segmentation protocol), mIoU on test."""
    settings = segmentation_settings(ctx)
    started = time.perf_counter()
    with feature_folder(ctx) as folder:
        (train, val, test), spec, stores, feature_s = _prepare(ctx, settings, folder)
        head, curve, best_epoch = train_linear_head(
            (stores[0], train),
            (stores[1], val),
            settings,
            seed=ctx.config.seed,
            device=ctx.device,
            progress=ctx.progress,
        )
        meter, preds = evaluate_head(head, stores[2], test, ctx.device, keep=settings["pictures"])
        cache_mb = sum(s.nbytes for s in stores) / 2**20
    picture = _plot(ctx, "segmentation", test, preds, "BN + 1×1 conv", meter.miou())
    protocol = {
        "name": "segmentation",
        "head": "batchnorm2d+conv1x1",
        "optimizer": "AdamW",
        "schedule": "cosine",
        "loss": "cross_entropy",
        "selection": "best validation mIoU epoch",
        **{k: settings[k] for k in ("head_epochs", "head_lr", "head_weight_decay", "head_batch_size")},
        **_protocol_fields(spec, settings, stores),
        "best_epoch": best_epoch,
        "val_curve": curve,
    }
    cost = {"feature_cache_mb": round(cache_mb, 2), "feature_seconds": round(feature_s, 2)}
    sets = (train, val, test)
    val_miou = max(curve) if curve else None
    return [_test_record(ctx, settings, spec, sets, meter, picture, protocol, cost, started, val_miou=val_miou)]


@register_protocol("segmentation_mlp")
def segmentation_mlp_protocol(ctx: EvalContext) -> list[dict]:
    """DDPM-seg's pixel-MLP ensemble on frozen dense features, mIoU on test."""
    settings = segmentation_settings(ctx)
    started = time.perf_counter()
    with feature_folder(ctx) as folder:
        (train, val, test), spec, stores, feature_s = _prepare(ctx, settings, folder)
        x, y = sample_pixels(stores[0], train, int(settings["mlp_pixels"]), seed=ctx.config.seed)
        net = train_mlp_ensemble(
            x, y, train.num_classes, settings, seed=ctx.config.seed, device=ctx.device, progress=ctx.progress
        )
        del x
        meter = IoUMeter(test.num_classes, test.ignore_index)
        kept, start = [], 0
        for preds in predict_mlp(net, stores[2], test.image_size, settings["mlp_vote"], device=ctx.device):
            meter.update(preds, test.masks[start : start + len(preds)])
            kept.append(preds[: max(0, settings["pictures"] - start)])
            start += len(preds)
        cache_mb = sum(s.nbytes for s in stores) / 2**20
    picture = _plot(ctx, "segmentation_mlp", test, torch.cat(kept), "pixel-MLP ensemble", meter.miou())
    protocol = {
        "name": "segmentation_mlp",
        "head": "pixel_mlp_ensemble",
        "optimizer": "Adam",
        "input_standardisation": "per-channel mean/std of the sampled train pixels",
        "pixel_sampling": "uniform over labelled train pixels, evenly per scene",
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items() if k.startswith("mlp_")},
        **_protocol_fields(spec, settings, stores),
        "train_pixels": len(y),
    }
    cost = {
        "feature_cache_mb": round(cache_mb, 2),
        "feature_seconds": round(feature_s, 2),
        "mlp_train_pixels_mb": round(len(y) * stores[0].dim * 2 / 2**20, 2),
    }
    return [_test_record(ctx, settings, spec, (train, val, test), meter, picture, protocol, cost, started)]


__all__ = [
    "SEGMENTATION_DEFAULTS",
    "plot_segmentation",
    "segmentation_mlp_protocol",
    "segmentation_protocol",
    "segmentation_settings",
]
