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

import hashlib
import itertools
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.scenes import SegmentationSet, load_segmentation
from ..errors import InputError
from ..io import atomic_path
from ..runtime import Runtime
from ..supervised import fit, shuffled_batches
from .features import Readout, data_config, normalise
from .harness import EvalContext, register_protocol

logger = logging.getLogger(__name__)

#: settings of both protocols; ``EvalConfig.extra["segmentation"]`` overrides them key by key
SEGMENTATION_DEFAULTS: dict = {
    "dataset": "fashion_scenes", "dataset_kwargs": {}, "train_images": 200, "val_images": 100, "test_images": 200,
    "input": "tile", "feature_stride": 4,
    "timesteps": (10, 50), "blocks": ("up0", "up1"), "add_readout": True,  # diffusion backbones (extract)
    "indices": 3,  # other backbones: the last n forward_intermediates maps (or a list of indices)
    "batch_size": 32, "amp": True,
    "head_epochs": 20, "head_lr": 0.03, "head_weight_decay": 1e-4, "head_batch_size": 8,
    "mlp_members": 10, "mlp_hidden": (128, 32), "mlp_pixels": 40000, "mlp_epochs": 4, "mlp_batch_size": 256,
    "mlp_lr": 2e-3, "mlp_vote": "mode",
    "pictures": 4,
}


def segmentation_settings(ctx: EvalContext) -> dict:
    """:data:`SEGMENTATION_DEFAULTS` with ``ctx.config.extra["segmentation"]`` applied; unknown keys raise."""
    given = dict((ctx.config.extra or {}).get("segmentation", {}))
    unknown = set(given) - set(SEGMENTATION_DEFAULTS)
    if unknown:
        raise InputError(f"unknown segmentation settings {sorted(unknown)}; "
                         f"valid: {', '.join(SEGMENTATION_DEFAULTS)}")
    settings = {**SEGMENTATION_DEFAULTS, **given}
    if settings["input"] not in ("tile", "full"):
        raise InputError(f"segmentation input must be 'tile' or 'full', got {settings['input']!r}")
    if settings["mlp_vote"] not in ("mode", "mean"):
        raise InputError(f"mlp_vote must be 'mode' or 'mean', got {settings['mlp_vote']!r}")
    return settings


def mean_iou(preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> float:
    """mIoU of integer label maps: torchmetrics' ``MulticlassJaccardIndex(average="macro")``."""
    from torchmetrics.classification import MulticlassJaccardIndex

    metric = MulticlassJaccardIndex(num_classes=num_classes, average="macro", ignore_index=ignore_index)
    return float(metric(preds.long(), target.long()))


class IoUMeter:
    """Accumulates predictions batch by batch: macro mIoU (the record's value) and per-class IoU."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        from torchmetrics.classification import MulticlassJaccardIndex

        # inputs are checked here once, not by torchmetrics at every batch (its checks sort every pixel)
        kw = {"num_classes": num_classes, "ignore_index": ignore_index, "validate_args": False}
        self.macro = MulticlassJaccardIndex(average="macro", **kw)
        self.per_class = MulticlassJaccardIndex(average="none", **kw)
        self.counts = torch.zeros(num_classes, dtype=torch.long)
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds, target = preds.long().cpu().flatten(), target.long().cpu().flatten()
        keep = target != self.ignore_index
        if preds.shape != target.shape or (preds < 0).any() or (preds >= self.num_classes).any() \
                or (target[keep] < 0).any() or (target[keep] >= self.num_classes).any():
            raise InputError(f"predictions and masks must be label maps of one shape with values in "
                             f"[0, {self.num_classes}) (masks may also hold {self.ignore_index})")
        self.macro.update(preds, target)
        self.per_class.update(preds, target)
        self.counts += torch.bincount(torch.cat([preds[keep], target[keep]]), minlength=self.num_classes)

    def miou(self) -> float:
        return float(self.macro.compute())

    def class_iou(self) -> list[float | None]:
        """IoU per class; None for a class in neither truth nor prediction (left out of the mean)."""
        values = self.per_class.compute().tolist()
        return [round(v, 5) if n else None for v, n in zip(values, self.counts.tolist())]


# ---------------------------------------------------------------------------------------------- features
def is_diffusion(model: nn.Module) -> bool:
    """Backbones read through ``extract(x, timesteps, blocks)`` with spatial maps (the DDAE U-Nets)."""
    return hasattr(model, "extract") and isinstance(getattr(model, "block_shapes", None), dict)


@dataclass(frozen=True)
class DenseSpec:
    """Which maps make the dense features, and how a scene is fed to the backbone."""

    maps: tuple[tuple, ...]  # ((timestep, block), ...) for extract, ((None, index), ...) for intermediates
    names: tuple[str, ...]
    input: str
    tile: int
    stride: int

    @property
    def uses_extract(self) -> bool:
        return bool(self.maps) and self.maps[0][0] is not None


def dense_spec(ctx: EvalContext, settings: dict) -> DenseSpec:
    """The feature maps the protocols read for ``ctx.model`` (see the module docstring)."""
    model = ctx.model
    tile = int(data_config(model)["input_size"][-1])
    stride = int(settings["feature_stride"])
    if stride < 1 or (settings["input"] == "tile" and tile % stride):
        raise InputError(f"feature_stride {stride} must be a positive divisor of the tile size {tile}")
    if is_diffusion(model):
        from .heads_protocols import _readout_block

        blocks = [b for b in settings["blocks"] if b in model.block_names]
        if len(blocks) < len(settings["blocks"]):
            logger.warning("segmentation: blocks %s are not in this backbone (it has %s)",
                           sorted(set(settings["blocks"]) - set(blocks)), model.block_names)
        maps = [(int(t), b) for t in settings["timesteps"] for b in blocks]
        readout = _readout_block(ctx) if settings["add_readout"] else None
        if readout is not None and readout[1] in model.block_names and tuple(readout) not in maps:
            maps.append((int(readout[0]), readout[1]))
        if not maps:
            raise InputError(f"no segmentation features: none of the blocks {list(settings['blocks'])} is in "
                             f"{model.block_names} and there is no readout block")
        names = [f"{b}@t{t}" for t, b in maps]
    else:
        if not hasattr(model, "forward_intermediates"):
            raise InputError(f"{type(model).__name__} has neither extract() nor forward_intermediates(); "
                             "segmentation needs dense feature maps")
        n = len(getattr(model, "feature_info", [])) or 1
        wanted = settings["indices"]
        indices = list(range(max(0, n - int(wanted)), n)) if isinstance(wanted, int) else [int(i) for i in wanted]
        if not indices or any(not 0 <= i < n for i in indices):
            raise InputError(f"segmentation indices {wanted} do not fit the backbone's {n} feature levels")
        maps = [(None, i) for i in indices]
        info = getattr(model, "feature_info", [{}] * n)
        names = [str(info[i].get("module") or f"level{i}") for i in indices]
    return DenseSpec(tuple(maps), tuple(names), settings["input"], tile, stride)


def _crop_padding(model: nn.Module, m: torch.Tensor) -> torch.Tensor:
    """Backbones that pad inside (MDSM: ``img_size`` 28 inside ``net_size`` 32) give maps of the padded image:
    keep the part over the image (bilinear crop, so any map size works)."""
    inner, outer = getattr(model, "img_size", None), getattr(model, "net_size", None)
    if not isinstance(inner, int) or not isinstance(outer, int) or outer <= inner:
        return m
    scale = inner / outer
    size = [max(1, round(m.shape[-2] * scale)), max(1, round(m.shape[-1] * scale))]
    theta = torch.tensor([[scale, 0.0, 0.0], [0.0, scale, 0.0]], dtype=torch.float32, device=m.device)
    grid = F.affine_grid(theta.expand(m.shape[0], 2, 3), [m.shape[0], m.shape[1], *size], align_corners=False)
    return F.grid_sample(m.float(), grid, mode="bilinear", align_corners=False)


def _resize(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(m.shape[-2:]) == tuple(size):
        return m.float()
    down = m.shape[-2] > size[0] or m.shape[-1] > size[1]
    return F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False, antialias=down)


def _run_backbone(model: nn.Module, spec: DenseSpec, x: torch.Tensor) -> list[torch.Tensor]:
    """The spec's NCHW maps of a normalised batch ``x``."""
    if spec.uses_extract:
        timesteps = list(dict.fromkeys(t for t, _ in spec.maps))
        out = {}
        for t in timesteps:  # one forward per timestep, stopping after its last block
            out.update(model.extract(x, [t], [b for tt, b in spec.maps if tt == t], pool=None))
        maps = [out[key] for key in spec.maps]
    else:
        indices = [i for _, i in spec.maps]
        maps = model.forward_intermediates(x, indices=indices, intermediates_only=True, output_fmt="NCHW",
                                           stop_early=True)
        if len(maps) != len(indices):  # backbones with a single level (raw pixels) ignore the indices
            maps = [maps[-1]] * len(indices) if len(maps) == 1 else maps[-len(indices):]
    for m, name in zip(maps, spec.names):
        if m.dim() != 4:
            raise InputError(f"feature {name} of {type(model).__name__} has shape {tuple(m.shape)}, not NCHW")
    return [_crop_padding(model, m) for m in maps]


@torch.no_grad()
def dense_features(model: nn.Module, spec: DenseSpec, images01: torch.Tensor) -> torch.Tensor:
    """(B, D, ⌈H/stride⌉, ⌈W/stride⌉) features of a batch of [0, 1] images (on the model's device)."""
    b, c, h, w = images01.shape
    hf, wf = math.ceil(h / spec.stride), math.ceil(w / spec.stride)
    if spec.input == "full":
        try:
            maps = _run_backbone(model, spec, normalise(model, images01))
        except (AssertionError, RuntimeError, InputError) as e:  # e.g. timm's fixed-size ViT assertion
            raise InputError(f"{type(model).__name__} cannot read {h}×{w} images whole ({e}); use the "
                             "segmentation setting input='tile'") from e
        return torch.cat([_resize(m, (hf, wf)) for m in maps], dim=1)
    t = spec.tile
    gh, gw = math.ceil(h / t), math.ceil(w / t)
    padded = F.pad(images01, (0, gw * t - w, 0, gh * t - h))  # black, like the scenes' background
    tiles = padded.view(b, c, gh, t, gw, t).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c, t, t)
    maps = _run_backbone(model, spec, normalise(model, tiles))
    ft = t // spec.stride
    out = []
    for m in maps:
        m = _resize(m, (ft, ft))
        m = m.view(b, gh, gw, -1, ft, ft).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, gh * ft, gw * ft)
        out.append(m[:, :, :hf, :wf])
    return torch.cat(out, dim=1)


class FeatureStore:
    """Dense features of one split on disk: a float16 ``.npy`` (N, D, h, w) read through ``np.memmap``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.array = np.load(self.path, mmap_mode="r")

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def get(self, idx) -> torch.Tensor:
        """Float32 features of the images at ``idx`` (read in sorted order, returned in ``idx`` order)."""
        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx)
        block = np.empty((len(idx), *self.array.shape[1:]), dtype=np.float32)
        block[order] = self.array[idx[order]]
        return torch.from_numpy(block)


def _store_key(ctx: EvalContext, spec: DenseSpec, data: SegmentationSet) -> str:
    h = hashlib.sha256(data.images.numpy().tobytes())
    h.update(json.dumps([ctx.model_hash, data.name, data.split, asdict(spec)], default=str).encode())
    return h.hexdigest()[:24]


def cache_dense_features(ctx: EvalContext, spec: DenseSpec, data: SegmentationSet, folder: Path,
                         batch_size: int = 32, amp: bool = True, model: nn.Module | None = None) -> FeatureStore:
    """Features of every image of ``data`` in a :class:`FeatureStore` under ``folder`` (reused if present)."""
    path = folder / f"{data.name}-{data.split}-{_store_key(ctx, spec, data)}.npy"
    if path.is_file():
        try:
            store = FeatureStore(path)
            if len(store) == len(data):
                return store
        except (ValueError, OSError):  # a damaged cache entry is recomputed, never trusted
            pass
        path.unlink(missing_ok=True)
    model = (model or ctx.model).to(ctx.device).eval()
    dev = torch.device(ctx.device)
    steps = range(0, len(data), batch_size)
    with atomic_path(path) as tmp:
        array = None
        for start in tqdm(steps, desc=f"dense features {data.name}/{data.split}", disable=not ctx.progress,
                          leave=False):
            x = data.images[start:start + batch_size].float().div_(255.0).to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                f = dense_features(model, spec, x)
            f = f.float().clamp_(-65000.0, 65000.0).cpu().numpy().astype(np.float16)
            if array is None:
                array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(data), *f.shape[1:]))
            array[start:start + len(f)] = f
        array.flush()
        del array
    return FeatureStore(path)


@contextmanager
def feature_folder(ctx: EvalContext) -> Iterator[Path]:
    """``cache_dir/segmentation/<model hash>`` (kept), or a temporary folder removed afterwards."""
    if ctx.cache_dir is not None:
        folder = Path(ctx.cache_dir) / "segmentation" / ctx.model_hash
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
    else:
        with tempfile.TemporaryDirectory(prefix="diffssl-seg-") as tmp:
            yield Path(tmp)


def feature_model(model: nn.Module, spec: DenseSpec) -> nn.Module:
    """The model to read: a DDAE U-Net switched to ``dynamic_img_size`` for ``input="full"``."""
    if spec.input == "full" and getattr(model, "dynamic_img_size", True) is False and hasattr(model, "with_settings"):
        return model.with_settings(dynamic_img_size=True)
    return model


# ---------------------------------------------------------------------------------------------- linear head
class LinearSegHead(nn.Module):
    """DINOv2's ``BNHead``: ``BatchNorm2d`` then a 1×1 conv; logits upsampled bilinearly to the mask size."""

    def __init__(self, in_channels: int, num_classes: int, prior: torch.Tensor | None = None):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        if prior is not None:  # start by predicting the class prior (see train_linear_head)
            with torch.no_grad():
                self.classifier.weight.zero_()
                self.classifier.bias.copy_(prior.clamp_min(1e-6).log())

    def forward(self, features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        logits = self.classifier(self.norm(features))
        return logits if size is None else F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_head(head: LinearSegHead, store: FeatureStore, size: tuple[int, int], batch_size: int = 32,
                 device: str | torch.device | None = None) -> Iterator[torch.Tensor]:
    """uint8 label maps (B, H, W) batch by batch, on ``device`` (default: the head's)."""
    head.eval()
    device = device if device is not None else head.classifier.weight.device
    for start in range(0, len(store), batch_size):
        f = store.get(range(start, min(len(store), start + batch_size))).to(device)
        yield head(f, size).argmax(1).to(torch.uint8).cpu()


def evaluate_head(head: LinearSegHead, store: FeatureStore, data: SegmentationSet,
                  device: str | torch.device | None = None,
                  keep: int = 0) -> tuple[IoUMeter, torch.Tensor]:
    """The head's IoU on ``data``, and its predictions for the first ``keep`` images."""
    meter = IoUMeter(data.num_classes, data.ignore_index)
    kept, start = [], 0
    for preds in predict_head(head, store, data.image_size, device=device):
        meter.update(preds, data.masks[start:start + len(preds)])
        kept.append(preds[:max(0, keep - start)])
        start += len(preds)
    return meter, torch.cat(kept)


def train_linear_head(train: tuple[FeatureStore, SegmentationSet], val: tuple[FeatureStore, SegmentationSet],
                      settings: dict, seed: int = 0, device: str | torch.device | None = None, progress: bool = False,
                      runtime: Runtime | None = None) -> tuple[LinearSegHead, list[float], int]:
    """Train the head (recipe in the module docstring) with :func:`~diffssl_plugin.supervised.fit`; returns
    the best-validation head, the validation mIoU after each epoch, and the best epoch (1-based)."""
    (f_train, d_train), (f_val, d_val) = train, val
    torch.manual_seed(seed)
    # the head starts at the train pixels' class frequencies (zero weights, log-prior bias): with a few hundred
    # steps a randomly started head can end below the "predict the prior" floor (raw pixels did: mIoU 0.005)
    labels = d_train.masks[d_train.masks != d_train.ignore_index].long()
    prior = torch.bincount(labels, minlength=d_train.num_classes).float() / max(1, len(labels))
    head = LinearSegHead(f_train.dim, d_train.num_classes, prior)
    bs = int(settings["head_batch_size"])
    steps = max(1, math.ceil(len(f_train) / bs))
    epochs = int(settings["head_epochs"])
    opt = torch.optim.AdamW(head.parameters(), lr=settings["head_lr"], weight_decay=settings["head_weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps))
    plan = shuffled_batches(len(f_train), bs, torch.Generator().manual_seed(seed), drop_last=False,
                            min_rows=2)  # batch norm needs two images

    def loss(m: LinearSegHead, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        f, y = batch  # summed over the pixels that count, divided by their number over every rank
        total = F.cross_entropy(m(f, d_train.image_size), y, ignore_index=d_train.ignore_index, reduction="sum")
        return total, (y != d_train.ignore_index).sum()

    result = fit(head, plan, lambda idx: (f_train.get(idx.numpy()), d_train.masks[idx].long()), loss, opt, sched,
                 epochs=epochs, validate=lambda m, d: evaluate_head(m, f_val, d_val, d)[0].miou(),
                 check_loss=False, desc="segmentation head", progress=progress, device=device, runtime=runtime)
    curve = [round(h["val"], 5) for h in result.history]
    return head.eval(), curve, result.best_epoch


# ---------------------------------------------------------------------------------------------- pixel MLPs
class PixelMLPEnsemble(nn.Module):
    """``members`` independent per-pixel MLPs (DDPM-seg's ``pixel_classifier``) evaluated as one batched network:
    Linear(D, h1)–ReLU–BN–Linear(h1, h2)–ReLU–BN–Linear(h2, C) per member. Inputs are standardised per channel
    with ``mean``/``std`` (buffers). ``forward`` takes (M, B, D) (each member its own pixels) or (B, D)
    (shared), and returns (M, B, C) logits."""

    def __init__(self, in_dim: int, num_classes: int, members: int = 10, hidden: Sequence[int] = (128, 32)):
        super().__init__()
        dims = [in_dim, *hidden, num_classes]
        self.members = members
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(members, a, b) * 0.02)
                                        for a, b in itertools.pairwise(dims))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(members, 1, b)) for b in dims[1:])
        self.norms = nn.ModuleList(nn.BatchNorm1d(members * h) for h in hidden)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    def first_layer(self, x: torch.Tensor) -> torch.Tensor:
        """Standardisation and the first linear layer: affine, so it commutes with bilinear resizing."""
        x = (x.float() - self.mean) / self.std
        if x.dim() == 2:
            return torch.einsum("bd,mdh->mbh", x, self.weights[0]) + self.biases[0]
        return torch.bmm(x, self.weights[0]) + self.biases[0]

    def rest(self, h: torch.Tensor) -> torch.Tensor:
        """ReLU–BN–Linear for every later layer; ``h`` is (M, B, h1)."""
        m, b = h.shape[:2]
        for norm, w, bias in zip(self.norms, self.weights[1:], self.biases[1:]):
            h = torch.relu(h)
            h = norm(h.transpose(0, 1).reshape(b, -1)).view(b, m, -1).transpose(0, 1)
            h = torch.bmm(h, w) + bias
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(self.first_layer(x))


def sample_pixels(store: FeatureStore, data: SegmentationSet, total: int, seed: int = 0, batch_size: int = 16
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``total`` labelled pixels drawn uniformly (as evenly as possible per image), with their features
    bilinearly upsampled to the pixel: float16 (P, D) and int64 (P,). RAM: P × D × 2 bytes."""
    n = len(data)
    per_image = torch.full((n,), total // n, dtype=torch.long)
    per_image[: total % n] += 1
    gen = torch.Generator().manual_seed(seed)
    size = data.image_size
    xs, ys = [], []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        f = _resize(store.get(idx), size).flatten(2)  # (B, D, H·W)
        for j, i in enumerate(idx):
            mask = data.masks[i].flatten().long()
            valid = torch.nonzero(mask != data.ignore_index).squeeze(1)
            pos = valid[torch.randperm(len(valid), generator=gen)[: int(per_image[i])]]
            xs.append(f[j][:, pos].t().to(torch.float16))
            ys.append(mask[pos])
    return torch.cat(xs), torch.cat(ys)


def train_mlp_ensemble(x: torch.Tensor, y: torch.Tensor, num_classes: int, settings: dict, seed: int = 0,
                       device: str | torch.device | None = None, progress: bool = False,
                       runtime: Runtime | None = None) -> PixelMLPEnsemble:
    """Train the ensemble on sampled pixels with :func:`~diffssl_plugin.supervised.fit`; each member sees its
    own shuffled order."""
    torch.manual_seed(seed)
    m = int(settings["mlp_members"])
    net = PixelMLPEnsemble(x.shape[1], num_classes, m, tuple(settings["mlp_hidden"]))
    xf = x.float()
    net.mean.copy_(xf.mean(0))
    net.std.copy_(xf.std(0).clamp_min(1e-6))
    del xf
    opt = torch.optim.Adam(net.parameters(), lr=settings["mlp_lr"])
    gen = torch.Generator().manual_seed(seed)
    bs, p = int(settings["mlp_batch_size"]), len(x)

    def plan() -> list[torch.Tensor]:  # rows: (pixel of member 1, …, pixel of member m)
        perms = torch.stack([torch.randperm(p, generator=gen) for _ in range(m)], 1)
        return [b for b in perms.split(bs) if len(b) >= 2]  # batch norm needs two pixels

    def loss(net: PixelMLPEnsemble, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        xb, yb = batch
        logits = net(xb)  # (M, b, C)
        # summed over members: each member gets the gradient it would get if trained alone
        per_pixel = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none")
        return per_pixel.view(m, -1).mean(1).sum()

    fit(net, plan, lambda idx: (x[idx.t()], y[idx.t()]), loss, opt, epochs=int(settings["mlp_epochs"]),
        check_loss=False, desc="pixel MLPs", progress=progress, device=device, runtime=runtime)
    return net.eval()


@torch.no_grad()
def predict_mlp(net: PixelMLPEnsemble, store: FeatureStore, size: tuple[int, int], vote: str = "mode",
                batch_size: int = 4, device: str | torch.device | None = None) -> Iterator[torch.Tensor]:
    """uint8 label maps (B, H, W) batch by batch: first layer at feature resolution, then upsampled (on
    ``device``, default: the ensemble's)."""
    net.eval()
    device = device if device is not None else net.mean.device
    m = net.members
    for start in range(0, len(store), batch_size):
        f = store.get(range(start, min(len(store), start + batch_size))).to(device)  # (B, D, h, w)
        b, d, h, w = f.shape
        hidden = net.first_layer(f.permute(0, 2, 3, 1).reshape(-1, d))  # (M, B·h·w, h1)
        hidden = hidden.view(m, b, h, w, -1).permute(1, 0, 4, 2, 3).reshape(b, -1, h, w)
        hidden = F.interpolate(hidden, size=size, mode="bilinear", align_corners=False)  # (B, M·h1, H, W)
        hidden = hidden.view(b, m, -1, size[0] * size[1]).permute(1, 0, 3, 2).reshape(m, -1, hidden.shape[1] // m)
        logits = net.rest(hidden)  # (M, B·H·W, C)
        if vote == "mode":
            labels = logits.argmax(-1).mode(dim=0).values
        else:
            labels = logits.softmax(-1).mean(0).argmax(-1)
        yield labels.view(b, *size).to(torch.uint8).cpu()


# ---------------------------------------------------------------------------------------------- picture
def plot_segmentation(images: torch.Tensor, masks: torch.Tensor, preds: torch.Tensor, class_names: Sequence[str],
                      path: str | os.PathLike, title: str = "", ignore_index: int = 255) -> Path:
    """Rows of (input, truth, prediction) with a class legend; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    k = len(class_names)
    base = plt.get_cmap("tab10" if k <= 11 else "tab20" if k <= 21 else "gist_ncar")
    colours = [(0.0, 0.0, 0.0, 1.0)] + [base(i % base.N if k <= 21 else i / max(1, k - 1)) for i in range(k - 1)]
    cmap = ListedColormap(colours + [(1.0, 1.0, 1.0, 1.0)])  # the last colour: ignored pixels

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
        fig.legend(handles=[Patch(color=colours[c], label=class_names[c]) for c in range(k)], loc="lower center",
                   ncol=4, fontsize=7, frameon=False)
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
    return tuple(load_segmentation(name, split, root=ctx.config.data_root, num_images=settings[f"{split}_images"],
                                   **kw) for split in ("train", "val", "test"))


def _prepare(ctx: EvalContext, settings: dict, folder: Path):
    """Scenes, feature spec and the three feature stores."""
    splits = _load(settings, ctx)
    spec = dense_spec(ctx, settings)
    model = feature_model(ctx.model, spec)
    started = time.perf_counter()
    stores = [cache_dense_features(ctx, spec, d, folder, settings["batch_size"], settings["amp"], model)
              for d in splits]
    return splits, spec, stores, time.perf_counter() - started


def _readout(spec: DenseSpec) -> Readout:
    """The record's readout: every map read, un-pooled (their timesteps are in the names)."""
    return Readout(None, "+".join(spec.names), "none")


def _protocol_fields(spec: DenseSpec, settings: dict, stores) -> dict:
    return {"dataset": settings["dataset"], "features": list(spec.names), "feature_dim": stores[0].dim,
            "feature_grid": list(stores[0].array.shape[-2:]), "input": spec.input, "tile": spec.tile,
            "feature_stride": spec.stride}


@register_protocol("segmentation")
def segmentation_protocol(ctx: EvalContext) -> list[dict]:
    """BatchNorm + 1×1 conv on frozen dense features (the linear segmentation protocol), mIoU on test."""
    settings = segmentation_settings(ctx)
    started = time.perf_counter()
    with feature_folder(ctx) as folder:
        (train, val, test), spec, stores, feature_s = _prepare(ctx, settings, folder)
        head, curve, best_epoch = train_linear_head((stores[0], train), (stores[1], val), settings,
                                                    seed=ctx.config.seed, device=ctx.device, progress=ctx.progress)
        meter, preds = evaluate_head(head, stores[2], test, ctx.device, keep=settings["pictures"])
        cache_mb = sum(s.nbytes for s in stores) / 2 ** 20
    miou = meter.miou()
    picture = _picture_path(ctx, "segmentation")
    if picture is not None and len(preds):
        plot_segmentation(test.images[:len(preds)], test.masks[:len(preds)], preds, test.class_names, picture,
                          f"{ctx.method} ({ctx.backbone_name}): BN + 1×1 conv, test mIoU {100 * miou:.1f}%")
    protocol = {"name": "segmentation", "head": "batchnorm2d+conv1x1", "optimizer": "AdamW", "schedule": "cosine",
                "loss": "cross_entropy", "selection": "best validation mIoU epoch",
                **{k: settings[k] for k in ("head_epochs", "head_lr", "head_weight_decay", "head_batch_size")},
                **_protocol_fields(spec, settings, stores), "best_epoch": best_epoch, "val_curve": curve}
    return [ctx.record(split="test", protocol=protocol, value=miou, metric="miou", dataset=settings["dataset"],
                       readout=_readout(spec), val_miou=max(curve) if curve else None,
                       per_class_iou=dict(zip(test.class_names, meter.class_iou())),
                       scenes={"train": len(train), "val": len(val), "test": len(test)},
                       picture=str(picture) if picture else None,
                       cost={"feature_cache_mb": round(cache_mb, 2), "feature_seconds": round(feature_s, 2),
                             "wall_seconds": round(time.perf_counter() - started, 2)})]


@register_protocol("segmentation_mlp")
def segmentation_mlp_protocol(ctx: EvalContext) -> list[dict]:
    """DDPM-seg's pixel-MLP ensemble on frozen dense features, mIoU on test."""
    settings = segmentation_settings(ctx)
    started = time.perf_counter()
    with feature_folder(ctx) as folder:
        (train, val, test), spec, stores, feature_s = _prepare(ctx, settings, folder)
        x, y = sample_pixels(stores[0], train, int(settings["mlp_pixels"]), seed=ctx.config.seed)
        net = train_mlp_ensemble(x, y, train.num_classes, settings, seed=ctx.config.seed, device=ctx.device,
                                 progress=ctx.progress)
        del x
        meter = IoUMeter(test.num_classes, test.ignore_index)
        kept, start = [], 0
        for preds in predict_mlp(net, stores[2], test.image_size, settings["mlp_vote"], device=ctx.device):
            meter.update(preds, test.masks[start:start + len(preds)])
            kept.append(preds[:max(0, settings["pictures"] - start)])
            start += len(preds)
        cache_mb = sum(s.nbytes for s in stores) / 2 ** 20
    miou = meter.miou()
    preds = torch.cat(kept)
    picture = _picture_path(ctx, "segmentation_mlp")
    if picture is not None and len(preds):
        plot_segmentation(test.images[:len(preds)], test.masks[:len(preds)], preds, test.class_names, picture,
                          f"{ctx.method} ({ctx.backbone_name}): pixel-MLP ensemble, test mIoU {100 * miou:.1f}%")
    protocol = {"name": "segmentation_mlp", "head": "pixel_mlp_ensemble", "optimizer": "Adam",
                "input_standardisation": "per-channel mean/std of the sampled train pixels",
                "pixel_sampling": "uniform over labelled train pixels, evenly per scene",
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items() if k.startswith("mlp_")},
                **_protocol_fields(spec, settings, stores), "train_pixels": len(y)}
    return [ctx.record(split="test", protocol=protocol, value=miou, metric="miou", dataset=settings["dataset"],
                       readout=_readout(spec), per_class_iou=dict(zip(test.class_names, meter.class_iou())),
                       scenes={"train": len(train), "val": len(val), "test": len(test)},
                       picture=str(picture) if picture else None,
                       cost={"feature_cache_mb": round(cache_mb, 2), "feature_seconds": round(feature_s, 2),
                             "mlp_train_pixels_mb": round(len(y) * stores[0].dim * 2 / 2 ** 20, 2),
                             "wall_seconds": round(time.perf_counter() - started, 2)})]


__all__ = ["SEGMENTATION_DEFAULTS", "DenseSpec", "FeatureStore", "IoUMeter", "LinearSegHead", "PixelMLPEnsemble",
           "cache_dense_features", "dense_features", "dense_spec", "mean_iou", "plot_segmentation", "predict_head",
           "predict_mlp", "sample_pixels", "segmentation_mlp_protocol", "segmentation_protocol",
           "segmentation_settings", "train_linear_head", "train_mlp_ensemble"]
