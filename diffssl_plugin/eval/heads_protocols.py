"""Harness protocols ``attention``, ``difformer`` and ``diffeed``: diffssl's heads on a frozen backbone.

Each trains its head on the train split (validation picks the epoch, see :mod:`diffssl_plugin.heads.training`)
and writes one test-split record named after the protocol, with the head's trainable parameters, training
images/s and memory cost. They read the readout the ``linear`` sweep chose when it ran before them (else the
backbone's own block and timestep).

* ``attention``: any backbone with ``extract`` (the chosen block's un-pooled map, cached), else any timm
  backbone with ``forward_intermediates`` (its last intermediate map, cached).
* ``difformer``: backbones with ``extract`` that have its blocks, i.e. diffusion U-Nets (cached maps of every
  block × timestep).
* ``diffeed``: diffusion U-Nets whose ``extract`` takes ``edits`` and that name mirrors (no cache: it trains
  on images).
Protocols that do not apply return ``[]`` at once and log why.

Settings: ``EvalConfig.extra[protocol]`` overrides :data:`PROTOCOL_DEFAULTS` (e.g.
``extra={"diffeed": {"train_images": 1000, "training_kwargs": {"epochs": 2}}}``).
"""

from __future__ import annotations

import logging
import time

import torch

from ..errors import InputError
from ..heads import (
    AttentionHead,
    DifFeed,
    DifFormer,
    accuracy,
    dict_rows,
    head_preset,
    image_rows,
    tensor_rows,
    train_head,
    training_preset,
)
from ..heads.attention import pooled_size
from ..heads.training import nbytes, peak_memory_mb
from .features import LAST_INTERMEDIATE, OUTPUT, Readout, normalise
from .harness import EvalContext, register_protocol

logger = logging.getLogger(__name__)

#: per-protocol settings; ``EvalConfig.extra[name]`` overrides them key by key
PROTOCOL_DEFAULTS: dict[str, dict] = {
    "attention": {
        "head": "cpu",
        "head_kwargs": {},
        "training": "small",
        "training_kwargs": {},
        "train_images": None,
        "val_images": None,
    },
    # diffssl fuses the mid block, the best single block and a later decoder block at three timesteps;
    # here the mid block and the next two decoder block outputs, at the sweep's timesteps (first three),
    # pooled to at most 4×4 (48 tokens per timestep) to keep the cost near three attention heads
    "difformer": {
        "head": "cpu",
        "head_kwargs": {"pool_size": 4},
        "training": "small",
        "training_kwargs": {},
        "train_images": None,
        "val_images": None,
        "blocks": ("mid", "up0", "up1"),
        "timesteps": None,
    },
    # two U-Net passes and a backward through the U-Net per image, nothing cached: fewer images and epochs,
    # bf16 for the U-Net, validation only after the last epoch
    "diffeed": {
        "head": "cpu",
        "head_kwargs": {},
        "training": "small",
        "training_kwargs": {"epochs": 3, "batch_size": 64, "amp": True, "eval_every": 3},
        "train_images": 2000,
        "val_images": 1000,
        "feedback_blocks": "auto",
    },
}


def protocol_settings(ctx: EvalContext, name: str) -> dict:
    """:data:`PROTOCOL_DEFAULTS` ``[name]`` with ``ctx.config.extra[name]`` applied (``head_kwargs`` and
    ``training_kwargs`` are merged key by key); unknown keys raise."""
    defaults = PROTOCOL_DEFAULTS[name]
    given = dict((ctx.config.extra or {}).get(name, {}))
    unknown = set(given) - set(defaults)
    if unknown:
        raise InputError(f"unknown {name} settings {sorted(unknown)}; valid: {', '.join(defaults)}")
    merged = {**defaults, **given}
    for k, v in defaults.items():
        if isinstance(v, dict) and k in given:
            merged[k] = {**v, **given[k]}
    return merged


def _training(ctx: EvalContext, settings: dict):
    return training_preset(settings["training"], **{"seed": ctx.config.seed, **settings["training_kwargs"]})


def _skip(name: str, ctx: EvalContext, why: str) -> list[dict]:
    logger.warning("protocol %r skipped for %s (%s): %s", name, ctx.method, ctx.backbone_name, why)
    return []


def _readout_block(ctx: EvalContext) -> tuple[int | None, str] | None:
    """(timestep, block): the linear sweep's choice if it ran, else the backbone's own (or None)."""
    best = ctx.best_readout
    if best is not None and best.block is not None:
        return best.timestep, best.block
    if hasattr(ctx.model, "timestep") and hasattr(ctx.model, "block"):
        return ctx.model.timestep, ctx.model.block
    return None


def map_shapes(ctx: EvalContext, data, timestep: int | None, blocks) -> dict[str, tuple]:
    """The shape of each block's ``extract`` map for one image of ``data`` (any size the backbone takes)."""
    device = torch.device(ctx.device)
    model = ctx.model.to(device).eval()
    x = normalise(model, data.images[:1].float().div_(255.0)).to(device)
    with torch.no_grad():
        maps = model.extract(x, [timestep], list(blocks), pool=None)
    return {b: tuple(maps[(timestep, b)].shape[1:]) for b in blocks}


def _map_readout(shape, timestep: int, block: str, pool_size: int) -> Readout:
    """The cached readout of a block's map pooled to the head's s × s (what the pre-layer pools to)."""
    _, h, w = shape
    k = pooled_size(shape, pool_size)
    if k == (h, w) or k[0] != k[1]:
        return Readout(timestep, block, "none")
    return Readout(timestep, block, f"avg{k[0]}x{k[0]}")


def _as_map(x: torch.Tensor, shape, pool_size: int) -> torch.Tensor:
    """A cached (N, C·s²) pooled feature back to (N, C, s, s); maps pass through."""
    if x.dim() == 4:
        return x
    h, w = pooled_size(shape, pool_size)
    return x.view(x.shape[0], shape[0], h, w)


def _splits(ctx: EvalContext, settings: dict):
    """The context's splits, with train and val cut to the protocol's ``train_images``/``val_images``."""
    train, val, test = ctx.splits()
    if settings["train_images"] is not None and settings["train_images"] < len(train):
        train = train.balanced_subset(total=settings["train_images"], seed=ctx.config.seed)
    if settings["val_images"] is not None and settings["val_images"] < len(val):
        val = val.balanced_subset(total=settings["val_images"], seed=ctx.config.seed)
    return train, val, test


def _record(
    ctx: EvalContext,
    name: str,
    result,
    test_acc: float,
    readout: Readout,
    protocol: dict,
    train_images: int,
    cache_bytes: int | None,
    wall: float,
) -> dict:
    cost = {
        "feature_cache_mb": None if cache_bytes is None else round(cache_bytes / 2**20, 2),
        "peak_memory_mb": round(peak_memory_mb(ctx.device), 1),
        "peak_memory_kind": "cuda_max_allocated" if ctx.device.startswith("cuda") else "process_max_rss",
        "wall_seconds": round(wall, 2),
    }
    return ctx.record(
        split="test",
        protocol={"name": name, **protocol, "training": result.config},
        value=test_acc,
        readout=readout,
        val_acc=result.val_acc,
        best_epoch=result.best_epoch,
        trainable_params=result.trainable_params,
        train_images_per_s=round(result.images_per_second, 1),
        train_seconds=round(result.train_seconds, 2),
        head_train_images=train_images,
        cost=cost,
    )


def _fit_and_record(
    ctx: EvalContext,
    settings: dict,
    name: str,
    head: torch.nn.Module,
    rows: list,
    readout: Readout,
    protocol: dict,
    train_images: int,
    cached: list,
    started: float,
) -> list[dict]:
    """Train ``head`` on ``rows`` (train, val, test) of the ``cached`` features, picking its epoch on val; its
    test record."""
    cfg = _training(ctx, settings)
    result = train_head(head, rows[0], rows[1], cfg, ctx.device, ctx.progress, desc=name)
    test_acc = accuracy(head, rows[2], cfg.batch_size * 2, ctx.device, cfg.amp)
    wall = time.perf_counter() - started
    cache_bytes = sum(nbytes(c) for c in cached)
    return [_record(ctx, name, result, test_acc, readout, protocol, train_images, cache_bytes, wall)]


# ---------------------------------------------------------------------------------------------- attention
def intermediate_maps(ctx: EvalContext, data, pool_size: int) -> torch.Tensor:
    """The last ``forward_intermediates`` map of a timm backbone, pooled to at most s × s, cached (extracted
    by the harness: on the device, sharded across ranks)."""
    readout = Readout(None, LAST_INTERMEDIATE, f"avg_upto{pool_size}")
    return ctx.features(data, [readout])[readout]


@register_protocol("attention")
def attention_protocol(ctx: EvalContext) -> list[dict]:
    """diffssl's attention head on the chosen block's un-pooled map (or a timm backbone's last map)."""
    settings = protocol_settings(ctx, "attention")
    model = ctx.model
    where = _readout_block(ctx) if hasattr(model, "extract") else None
    if where is None and not hasattr(model, "forward_intermediates"):
        return _skip("attention", ctx, "the backbone has neither extract() and a readout nor forward_intermediates()")
    sizes = head_preset(settings["head"], **settings["head_kwargs"])
    s = sizes["pool_size"]
    started = time.perf_counter()
    train, val, test = _splits(ctx, settings)
    if where is not None:
        t, block = where
        shape = map_shapes(ctx, train, t, [block])[block]
        if len(shape) != 3:
            return _skip("attention", ctx, f"extract() gave {shape}-shaped features, not (C, H, W) maps")
        r = _map_readout(shape, t, block, s)
        maps = [_as_map(ctx.features(d, [r])[r], shape, s) for d in (train, val, test)]
        readout, source = Readout(t, block, "none"), {"input": "un-pooled map", "cached_pool": r.pool}
    else:
        maps = [intermediate_maps(ctx, d, s) for d in (train, val, test)]
        shape = tuple(maps[0].shape[1:])
        readout, source = OUTPUT, {"input": "forward_intermediates[-1]"}
    head = AttentionHead(shape, train.num_classes, **sizes)
    rows = [tensor_rows(m, d.labels) for m, d in zip(maps, (train, val, test))]
    protocol = {"head": "attention", "sizes": sizes, "tokens": head.pre.num_tokens, **source}
    return _fit_and_record(ctx, settings, "attention", head, rows, readout, protocol, len(train), maps, started)


# ---------------------------------------------------------------------------------------------- DifFormer
@register_protocol("difformer")
def difformer_protocol(ctx: EvalContext) -> list[dict]:
    """DifFormer on cached maps of several blocks × timesteps of a diffusion backbone."""
    settings = protocol_settings(ctx, "difformer")
    model = ctx.model
    if not hasattr(model, "extract"):
        return _skip("difformer", ctx, "DifFormer needs a diffusion backbone (extract at blocks, timesteps)")
    blocks = [b for b in settings["blocks"] if b in model.block_names]
    if not blocks:
        return _skip("difformer", ctx, f"none of the blocks {list(settings['blocks'])} is in this backbone")
    timesteps = list(settings["timesteps"] or list(ctx.config.timesteps)[:3])
    sizes = head_preset(settings["head"], **settings["head_kwargs"])
    s = sizes["pool_size"]
    started = time.perf_counter()
    train, val, test = _splits(ctx, settings)
    shapes = map_shapes(ctx, train, timesteps[0], blocks)
    readouts = {(t, b): _map_readout(shapes[b], t, b, s) for t in timesteps for b in blocks}
    feats = []
    for d in (train, val, test):
        got = ctx.features(d, list(readouts.values()))
        feats.append({k: _as_map(got[r], shapes[k[1]], s) for k, r in readouts.items()})
    head = DifFormer(shapes, timesteps, train.num_classes, **sizes)
    rows = [dict_rows(f, d.labels) for f, d in zip(feats, (train, val, test))]
    protocol = {
        "head": "difformer",
        "sizes": sizes,
        "blocks": blocks,
        "timesteps": timesteps,
        "tokens_per_timestep": head.num_tokens,
        "input": "un-pooled maps",
    }
    return _fit_and_record(ctx, settings, "difformer", head, rows, OUTPUT, protocol, len(train), feats, started)


# ---------------------------------------------------------------------------------------------- DifFeed
@register_protocol("diffeed")
def diffeed_protocol(ctx: EvalContext) -> list[dict]:
    """DifFeed (feedback + attention head) trained on images: two U-Net passes per image, nothing cached."""
    settings = protocol_settings(ctx, "diffeed")
    model = ctx.model
    if not (hasattr(model, "extract") and hasattr(model, "mirror_block")):
        return _skip("diffeed", ctx, "DifFeed needs a diffusion U-Net: extract(edits=) and mirror_block()")
    started = time.perf_counter()
    t, block = _readout_block(ctx)
    train, val, test = _splits(ctx, settings)
    flags = [p.requires_grad for p in model.parameters()]
    try:
        net = DifFeed(
            model,
            train.num_classes,
            timestep=t,
            block=block,
            feedback_blocks=settings["feedback_blocks"],
            head=settings["head"],
            image_size=tuple(train.images.shape[-2:]),
            **settings["head_kwargs"],
        )
        cfg = _training(ctx, settings)
        rows = [image_rows(d.images, d.labels, lambda x: normalise(model, x)) for d in (train, val, test)]
        result = train_head(net, rows[0], rows[1], cfg, ctx.device, ctx.progress, desc="diffeed")
        test_acc = accuracy(net, rows[2], cfg.batch_size, ctx.device, cfg.amp)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    protocol = {
        "head": "diffeed",
        "sizes": head_preset(settings["head"], **settings["head_kwargs"]),
        "feedback": dict(zip(net.sources, net.targets)),
        "input": "images (no cache: pass 2 trains)",
    }
    return [
        _record(
            ctx,
            "diffeed",
            result,
            test_acc,
            Readout(t, block, "none"),
            protocol,
            len(train),
            None,
            time.perf_counter() - started,
        )
    ]


__all__ = [
    "PROTOCOL_DEFAULTS",
    "attention_protocol",
    "diffeed_protocol",
    "difformer_protocol",
    "intermediate_maps",
    "protocol_settings",
]
