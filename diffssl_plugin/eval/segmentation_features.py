"""Dense frozen features for the segmentation protocols (:mod:`diffssl_plugin.eval.segmentation` describes them):
which maps are read, how scenes are tiled, and the float16 memmap store they are written to once per split."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.scenes import SegmentationSet
from ..errors import InputError
from ..io import atomic_path
from ..runtime import mixed_precision
from .features import data_config, normalise
from .harness import EvalContext

logger = logging.getLogger(__name__)


#: settings of both protocols; ``EvalConfig.extra["segmentation"]`` overrides them key by key
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
            logger.warning(
                "segmentation: blocks %s are not in this backbone (it has %s)",
                sorted(set(settings["blocks"]) - set(blocks)),
                model.block_names,
            )
        maps = [(int(t), b) for t in settings["timesteps"] for b in blocks]
        readout = _readout_block(ctx) if settings["add_readout"] else None
        if readout is not None and readout[1] in model.block_names and tuple(readout) not in maps:
            maps.append((int(readout[0]), readout[1]))
        if not maps:
            raise InputError(
                f"no segmentation features: none of the blocks {list(settings['blocks'])} is in "
                f"{model.block_names} and there is no readout block"
            )
        names = [f"{b}@t{t}" for t, b in maps]
    else:
        if not hasattr(model, "forward_intermediates"):
            raise InputError(
                f"{type(model).__name__} has neither extract() nor forward_intermediates(); "
                "segmentation needs dense feature maps"
            )
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


def resize_map(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
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
        maps = model.forward_intermediates(
            x, indices=indices, intermediates_only=True, output_fmt="NCHW", stop_early=True
        )
        if len(maps) != len(indices):  # backbones with a single level (raw pixels) ignore the indices
            maps = [maps[-1]] * len(indices) if len(maps) == 1 else maps[-len(indices) :]
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
            raise InputError(
                f"{type(model).__name__} cannot read {h}×{w} images whole ({e}); use the "
                "segmentation setting input='tile'"
            ) from e
        return torch.cat([resize_map(m, (hf, wf)) for m in maps], dim=1)
    t = spec.tile
    gh, gw = math.ceil(h / t), math.ceil(w / t)
    padded = F.pad(images01, (0, gw * t - w, 0, gh * t - h))  # black, like the scenes' background
    tiles = padded.view(b, c, gh, t, gw, t).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c, t, t)
    maps = _run_backbone(model, spec, normalise(model, tiles))
    ft = t // spec.stride
    out = []
    for m in maps:
        m = resize_map(m, (ft, ft))
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


def cache_dense_features(
    ctx: EvalContext,
    spec: DenseSpec,
    data: SegmentationSet,
    folder: Path,
    batch_size: int = 32,
    amp: bool = True,
    model: nn.Module | None = None,
) -> FeatureStore:
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
        for start in tqdm(
            steps, desc=f"dense features {data.name}/{data.split}", disable=not ctx.progress, leave=False
        ):
            x = data.images[start : start + batch_size].float().div_(255.0).to(dev)
            with mixed_precision(dev, enabled=amp):
                f = dense_features(model, spec, x)
            f = f.float().clamp_(-65000.0, 65000.0).cpu().numpy().astype(np.float16)
            if array is None:
                array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(data), *f.shape[1:]))
            array[start : start + len(f)] = f
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
