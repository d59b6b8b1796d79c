"""Frozen features, extracted once per (checkpoint, dataset, split, block, timestep, pool) and cached on disk.

Any backbone works: a diffusion backbone with ``extract`` (one U-Net forward per timestep gives every block),
any timm model (``forward_head(forward_features(x), pre_logits=True)``), or a lightly-style module whose
``forward`` returns (B, …). Images are normalised with the model's own ``pretrained_cfg`` mean/std
(``timm.data.resolve_model_data_config``), never with a fixed convention.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..backbones.checks import check_model_inputs
from ..backbones.memory_format import use_preferred_memory_format
from ..backbones.pooling import pool_features
from ..data import ImageSet
from ..errors import InputError
from ..io import atomic_path, state_dict_sha256
from ..runtime import Runtime, current, inference_batch_size, mixed_precision


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
    mean, std = _mean_std(model, images01.shape[1], images01.device)
    return (images01 - mean.to(images01.dtype)) / std.to(images01.dtype)


def pooled_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (B, D) feature vector of any backbone (timm with or without a head, or lightly-style)."""
    if hasattr(model, "forward_head") and getattr(model, "num_classes", 0):
        return model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)
    return model(x).flatten(1)


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's weights and readout-relevant settings (the feature-cache key)."""
    h = hashlib.sha256(state_dict_sha256(model.state_dict()).encode())
    for attr in ("noise_seed", "noise_scheme", "num_train_timesteps", "in_chans"):
        h.update(f"{attr}={getattr(model, attr, None)}".encode())
    h.update(type(model).__name__.encode())
    return h.hexdigest()[:16]


class FeatureCache:
    """One safetensors file per (model, dataset, split, images, readout), safe to share between processes.

    Writers never collide: each entry is written to a private temporary file, flushed to disk and moved into
    place with one atomic rename, so two evaluations sharing a cache both finish (the second rename replaces
    an identical entry) and a reader only ever sees a whole entry. Readers trust nothing they cannot check: the
    entry's metadata carries its cache key and a SHA-256 of its values, and an entry that is torn, zero-filled,
    from another key or unreadable is ignored (with a warning) and recomputed. Temporary files of a writer
    killed mid-write are never read, and are removed once they are an hour old.
    """

    #: bump when the entry layout changes: older entries are recomputed
    FORMAT = "2"
    #: a temporary file older than this belongs to a dead writer
    STALE_SECONDS = 3600

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root else None
        self._keys: dict[Path, str] = {}  # the key of every path handed out, for save()

    @staticmethod
    def key(model_hash: str, data: ImageSet, readout: Readout) -> str:
        ids = hashlib.sha256(data.indices.numpy().tobytes()).hexdigest()[:12] if data.indices is not None else "all"
        return json.dumps(
            [model_hash, data.name, data.split, len(data), ids, readout.timestep, readout.block, readout.pool]
        )

    def path(self, model_hash: str, data: ImageSet, readout: Readout) -> Path | None:
        if self.root is None:
            return None
        key = self.key(model_hash, data, readout)
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        path = self.root / model_hash / f"{data.name}-{data.split}-{digest}.safetensors"
        self._keys[path] = key
        return path

    def load(self, path: Path | None, key: str | None = None) -> torch.Tensor | None:
        """The entry at ``path`` if it is whole and holds ``key`` (default: the key :meth:`path` made ``path``
        from), else None: the caller recomputes it."""
        if path is None or not path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                features = f.get_tensor("features")
        except Exception as e:  # noqa: BLE001 -- safetensors raises several types for a torn file
            return self._distrust(path, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
        if meta.get("format") != self.FORMAT or "key" not in meta:
            return self._distrust(path, "written by another version")
        expected = key or self._keys.get(path)
        if meta["key"] != expected and (
            expected or hashlib.sha256(meta["key"].encode()).hexdigest()[:24] not in path.name
        ):
            return self._distrust(path, "holds the features of another key")
        if _values_sha256(features) != meta.get("sha256"):
            return self._distrust(path, "its values do not match their checksum (torn or zero-filled)")
        return features

    @staticmethod
    def _distrust(path: Path, why: str) -> None:
        import warnings

        warnings.warn(f"feature cache entry {path} is {why}; recomputing it", stacklevel=3)
        return None

    def save(self, path: Path | None, features: torch.Tensor, key: str | None = None) -> None:
        """Write an entry atomically (private temporary file, fsync, rename). ``key`` defaults to the key
        :meth:`path` made ``path`` from (:meth:`load` checks that the two agree)."""
        if path is None:
            return
        from safetensors.torch import save_file

        features = features.contiguous()
        key = key or self._keys.get(path)
        if key is None:
            raise InputError(f"no cache key for {path}: pass key=, or take the path from FeatureCache.path")
        meta = {"format": self.FORMAT, "key": key, "sha256": _values_sha256(features)}
        with atomic_path(path) as tmp:
            save_file({"features": features}, str(tmp), metadata=meta)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())  # the data is on disk before the rename makes it visible
        self._remove_stale_temporaries(path.parent)

    def _remove_stale_temporaries(self, folder: Path) -> None:
        import time

        now = time.time()
        for tmp in folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > self.STALE_SECONDS:
                    tmp.unlink()


def _values_sha256(features: torch.Tensor) -> str:
    flat = features.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"").hexdigest()


def _to_device(images_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A uint8 batch on ``device``: pinned and copied without blocking the host on a GPU."""
    if device.type == "cuda":
        return images_uint8.pin_memory().to(device, non_blocking=True)
    return images_uint8.to(device)


#: the block name of a timm backbone's last ``forward_intermediates`` map (pool ``avg_upto{s}``: adaptive
#: average pooling to at most s × s), what the attention head reads from backbones without ``extract``
LAST_INTERMEDIATE = "forward_intermediates[-1]"


def _last_intermediate(model: nn.Module, x: torch.Tensor, pool: str) -> torch.Tensor:
    from ..heads.attention import pooled_size

    maps = model.forward_intermediates(x, indices=1, intermediates_only=True)[-1]
    if maps.dim() != 4:
        raise InputError(
            f"forward_intermediates of {type(model).__name__} gave shape {tuple(maps.shape)}, not an NCHW map"
        )
    size = pooled_size(maps.shape[1:], int(pool.removeprefix("avg_upto")))
    return torch.nn.functional.adaptive_avg_pool2d(maps.float(), size)


def _noise_index(data, start: int, end: int, device: torch.device) -> torch.Tensor:
    """The dataset positions of rows ``start:end`` that seeded extraction noise is drawn for: the images' indices
    in their source array when the set has them (so an image gets the same noise in every subset that holds
    it), else their positions in ``data``."""
    index = data.indices[start:end] if getattr(data, "indices", None) is not None else torch.arange(start, end)
    return index.to(device)


def _extract_takes(model: nn.Module, argument: str) -> bool:
    """Whether ``model.extract`` accepts ``argument=`` (``index``: the dataset positions its seeded noise is
    drawn for; ``with_output``: it can return the pooled output from the same forward)."""
    import inspect

    extract = getattr(model, "extract", None)
    return extract is not None and argument in inspect.signature(extract).parameters


def _forward_batch(
    model: nn.Module,
    x: torch.Tensor,
    missing: Sequence[Readout],
    timesteps: list[int],
    blocks: list[str],
    index: torch.Tensor | None = None,
) -> dict[Readout, torch.Tensor]:
    """Every missing readout of one batch. ``index``: the images' dataset positions, for backbones whose
    ``extract`` draws per-image seeded noise from them (the same ε for an image whatever the batching)."""
    kwargs = {"index": index} if index is not None else {}
    # the pooled output from the blocks' forward where ``extract`` can give it (a ViT: one forward, not two)
    shared_output = bool(blocks) and any(r.block is None for r in missing) and _extract_takes(model, "with_output")
    if shared_output:
        kwargs["with_output"] = True
    maps = model.extract(x, timesteps, blocks, pool=None, **kwargs) if blocks else {}
    out = {}
    for r in missing:
        if r.block is None:
            out[r] = maps["output"] if shared_output else pooled_output(model, x)
        elif r.block == LAST_INTERMEDIATE:
            out[r] = _last_intermediate(model, x, r.pool)
        else:
            out[r] = pool_features(maps[(r.timestep, r.block)], r.pool)
    return out


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


@torch.no_grad()
def extract_features(
    model: nn.Module,
    data: ImageSet,
    readouts: Sequence[Readout] = (OUTPUT,),
    batch_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    model_hash: str | None = None,
    device: str | torch.device | None = None,
    amp: bool = True,
    progress: bool = True,
    runtime: Runtime | None = None,
) -> dict[Readout, torch.Tensor]:
    """Features of every image of ``data`` at each readout, as float32 (N, D) CPU tensors (NCHW maps for
    unpooled readouts), cached on disk.

    For a diffusion backbone, the readouts missing from the cache are computed together: one U-Net forward
    per (batch, timestep) gives every block requested at that timestep. Images travel to the device as uint8
    (pinned, non-blocking on a GPU) and are normalised there, under the runtime's autocast (bf16 where the
    device supports it, else fp16; ``amp=False``: fp32). On a GPU that runs out of memory the batch is halved
    and retried.

    Under several processes (``runtime.world_size > 1``) each rank extracts its contiguous shard of ``data``
    and the shards are gathered in order, so every image is seen exactly once and every rank returns the same
    (N, D) tensors; rank 0 alone reads the cache's verdict first and alone writes new entries.
    """
    if len(data) == 0:
        raise InputError(f"{data.name}/{data.split} has no images to extract features from")
    rt = runtime or current()
    device = torch.device(device) if device is not None else rt.device
    cache = FeatureCache(cache_dir)
    model_hash = model_hash or (model_fingerprint(model) if cache.root else "")
    out: dict[Readout, torch.Tensor] = {}
    if rt.is_global_zero:  # rank 0 reads the cache and tells the others, so all ranks run the same collectives
        for r in readouts:
            cached = cache.load(cache.path(model_hash, data, r))
            if cached is not None and cached.shape[0] == len(data):
                out[r] = cached
    missing = rt.broadcast([r for r in readouts if r not in out])
    for r in readouts:
        if r not in out and r not in missing:  # another rank: the entry rank 0 found (written atomically)
            out[r] = cache.load(cache.path(model_hash, data, r))
    if not missing:
        return out
    model = use_preferred_memory_format(model.to(device).eval())
    batch_size = inference_batch_size(device, batch_size)
    # value checks (NaN/inf, range) once per dataset on its first batch, not in every forward (host syncs)
    check_model_inputs(model, normalise(model, data.images[:batch_size].float().div_(255.0)).to(device))
    shard_multiple = batch_size  # shards hold one process's batches, whatever the world size (bit-equal features)
    shard = rt.shard(len(data), multiple=shard_multiple)
    chunks: dict[Readout, list[torch.Tensor]] = {r: [] for r in missing}
    timesteps = sorted({r.timestep for r in missing if r.block not in (None, LAST_INTERMEDIATE)})
    blocks = sorted({r.block for r in missing if r.block not in (None, LAST_INTERMEDIATE)})
    mean_std = None
    takes_index = _extract_takes(model, "index")
    if device.type == rt.device_type:

        def autocast():
            return rt.autocast(enabled=amp)
    else:  # an explicit device other than the runtime's (e.g. evaluating on the CPU from a GPU job)

        def autocast():
            return mixed_precision(device, enabled=amp)

    bar = tqdm(
        total=len(shard),
        desc=f"features {data.name}/{data.split}",
        disable=not progress or not rt.is_global_zero,
        leave=False,
        unit="img",
    )
    start, stop = shard.start, shard.stop
    while start < stop:
        end = min(stop, start + batch_size)
        batch = _to_device(data.images[start:end], device)
        if mean_std is None:
            mean_std = _mean_std(model, batch.shape[1], device)
        x = (batch.float().div_(255.0) - mean_std[0]) / mean_std[1]
        try:
            with autocast():
                index = _noise_index(data, start, end, device) if takes_index else None
                feats = _forward_batch(model, x, missing, timesteps, blocks, index)
        except RuntimeError as e:
            if device.type != "cuda" or batch_size == 1 or not _is_out_of_memory(e):
                raise
            torch.cuda.empty_cache()
            batch_size = max(1, batch_size // 2)
            continue
        for r, f in feats.items():
            chunks[r].append(f.float().to("cpu", non_blocking=device.type == "cuda"))
        bar.update(end - start)
        start = end
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the non-blocking copies to the host are complete
    for r in missing:
        local = torch.cat(chunks[r]) if chunks[r] else None
        # a rank whose shard is empty (more ranks than images) learns the feature width from rank 0
        width = rt.broadcast(tuple(local.shape[1:]) if local is not None else None)
        local = local if local is not None else torch.empty((0, *width))
        out[r] = rt.gather_shards(local, len(data), multiple=shard_multiple)
        if rt.is_global_zero:
            cache.save(cache.path(model_hash, data, r), out[r])
    rt.barrier()  # new cache entries are complete before any rank reads them
    return {r: out[r] for r in readouts}


def _mean_std(model: nn.Module, channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = data_config(model)
    mean = torch.tensor(cfg["mean"][:channels], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"][:channels], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return mean, std
