"""Frozen features, extracted once per (checkpoint, dataset, split, block, timestep, pool) and cached on disk.

Any backbone works: a diffusion backbone with ``extract`` (one U-Net forward per timestep gives every block),
any timm model (``forward_head(forward_features(x), pre_logits=True)``), or a lightly-style module whose
``forward`` returns (B, …). Images are normalised with the model's own ``pretrained_cfg`` mean/std
(``timm.data.resolve_model_data_config``), never with a fixed convention.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..backbones.pooling import pool_features
from ..data import ImageSet
from ..io import atomic_path, state_dict_sha256


@dataclass(frozen=True, order=True)
class Readout:
    """Where a feature vector is read: ``(timestep, block, pool)`` for diffusion backbones; all ``None`` means
    the model's own pooled output."""

    timestep: int | None = None
    block: str | None = None
    pool: str | None = None

    def label(self) -> str:
        if self.block is None:
            return "output"
        return f"{self.block}@t{self.timestep}/{self.pool}"


OUTPUT = Readout()


def data_config(model: nn.Module) -> dict:
    """The model's preprocessing (input size, mean, std) from its timm ``pretrained_cfg``."""
    from timm.data import resolve_model_data_config

    return resolve_model_data_config(model)


def normalise(model: nn.Module, images01: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] → the model's input range (mean/std of its ``pretrained_cfg``)."""
    cfg = data_config(model)
    c = images01.shape[1]
    mean = torch.tensor(cfg["mean"][:c], dtype=images01.dtype).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"][:c], dtype=images01.dtype).view(1, -1, 1, 1)
    return (images01 - mean.to(images01.device)) / std.to(images01.device)


def pooled_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (B, D) feature vector of any backbone (timm with or without a head, or lightly-style)."""
    if hasattr(model, "forward_head") and getattr(model, "num_classes", 0):
        return model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)
    return model(x).flatten(1)


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's weights and readout-relevant settings (the feature-cache key)."""
    h = hashlib.sha256(state_dict_sha256(model.state_dict()).encode())
    for attr in ("noise_seed", "num_train_timesteps", "in_chans"):
        h.update(f"{attr}={getattr(model, attr, None)}".encode())
    h.update(type(model).__name__.encode())
    return h.hexdigest()[:16]


class FeatureCache:
    """One safetensors file per (model, dataset, split, images, readout); writes are atomic."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root else None

    def path(self, model_hash: str, data: ImageSet, readout: Readout) -> Path | None:
        if self.root is None:
            return None
        ids = hashlib.sha256(data.indices.numpy().tobytes()).hexdigest()[:12] if data.indices is not None else "all"
        key = json.dumps([model_hash, data.name, data.split, len(data), ids, readout.timestep, readout.block,
                          readout.pool])
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        return self.root / model_hash / f"{data.name}-{data.split}-{digest}.safetensors"

    def load(self, path: Path | None) -> torch.Tensor | None:
        if path is None or not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(path))["features"]
        except Exception:  # a damaged cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
            return None

    def save(self, path: Path | None, features: torch.Tensor) -> None:
        if path is None:
            return
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({"features": features.contiguous()}, str(tmp))


@torch.no_grad()
def extract_features(model: nn.Module, data: ImageSet, readouts: Sequence[Readout] = (OUTPUT,),
                     batch_size: int = 256, cache_dir: str | os.PathLike | None = None,
                     model_hash: str | None = None, device: str | torch.device = "cpu", amp: bool = True,
                     progress: bool = True) -> dict[Readout, torch.Tensor]:
    """Features of every image of ``data`` at each readout, as float32 (N, D) tensors, cached on disk.

    For a diffusion backbone, the readouts missing from the cache are computed together: one U-Net forward
    per (batch, timestep) gives every block requested at that timestep.
    """
    cache = FeatureCache(cache_dir)
    model_hash = model_hash or (model_fingerprint(model) if cache.root else "")
    out: dict[Readout, torch.Tensor] = {}
    missing = []
    for r in readouts:
        cached = cache.load(cache.path(model_hash, data, r))
        if cached is not None and cached.shape[0] == len(data):
            out[r] = cached
        else:
            missing.append(r)
    if not missing:
        return out
    model = model.to(device).eval()
    device = torch.device(device)
    chunks: dict[Readout, list[torch.Tensor]] = {r: [] for r in missing}
    timesteps = sorted({r.timestep for r in missing if r.block is not None})
    blocks = sorted({r.block for r in missing if r.block is not None})
    steps = range(0, len(data), batch_size)
    bar = tqdm(steps, desc=f"features {data.name}/{data.split}", disable=not progress, leave=False)
    for start in bar:
        x = normalise(model, data.images[start:start + batch_size].float().div_(255.0)).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            maps = model.extract(x, timesteps, blocks, pool=None) if blocks else {}
            for r in missing:
                feats = pooled_output(model, x) if r.block is None else pool_features(maps[(r.timestep, r.block)],
                                                                                     r.pool)
                chunks[r].append(feats.float().cpu())
    for r in missing:
        out[r] = torch.cat(chunks[r])
        cache.save(cache.path(model_hash, data, r), out[r])
    return out
