"""Weights into modules, safely and strictly: read a state dict, unwrap it, load it with ``strict=True``, and
read a diffusers ``UNet2DModel`` folder the same way.

Every file goes through :func:`diffssl_plugin.io.load_weights` (safetensors, or ``torch.load`` with
``weights_only=True``), so a pickle that needs code to load is refused and a truncated file names itself.
Backbones (``DDAEBackbone.from_diffusers``) and the official-checkpoint loaders (:mod:`diffssl_plugin.checkpoints`)
both build on this module, which imports neither.

**diffusers folders.** ``model_index.json`` (optional), ``unet/config.json`` + ``unet/diffusion_pytorch_model.
{safetensors,bin}`` (or a sharded ``*.index.json``), ``scheduler/scheduler_config.json`` (optional: the DDPM
paper's linear schedule is the default). A bare U-Net folder (``config.json`` + weights) loads too. Folders
written by diffusers before 0.15 (``google/ddpm-cifar10-32`` among them) name the attention projections
``query``/``key``/``value``/``proj_attn``; they are renamed to ``to_q``/``to_k``/``to_v``/``to_out.0`` as diffusers
itself does on load (``ModelMixin._fix_state_dict_keys_on_load``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import UNet2DModel
from torch import nn

from .diffusion.schedule import DDPM_DEFAULTS
from .errors import CheckpointError
from .io import load_weights

# Keys under which training scripts commonly nest the weights in a checkpoint dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "netE", "ema", "module")


def is_state_dict(obj: object) -> bool:
    """A non-empty mapping of string names to tensors."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def unwrap_state_dict(obj: object, path: str | os.PathLike, wrapper_key: str | None = None) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a loaded checkpoint: the object itself, ``obj[wrapper_key]``, or the first of
    :data:`WRAPPER_KEYS` that holds one. Anything else raises :class:`CheckpointError` naming the file."""
    if wrapper_key is not None:
        if not isinstance(obj, Mapping) or wrapper_key not in obj:
            keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{path}: no entry {wrapper_key!r} in the checkpoint (it has: {keys})")
        obj = obj[wrapper_key]
    if is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if is_state_dict(obj.get(key)):
                return dict(obj[key])
        keys = sorted(map(str, obj))[:20]
        raise CheckpointError(
            f"{path}: no state dict found (top-level keys: {keys}); pass wrapper_key= to "
            "name the entry that holds the weights"
        )
    raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from every key if *all* keys carry it (``nn.DataParallel``/DDP save ``module.``)."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def read_state_dict(
    path: str | os.PathLike, wrapper_key: str | None = None, prefixes: tuple[str, ...] = ("module.",)
) -> dict[str, torch.Tensor]:
    """Safely load ``path`` and return its state dict, unwrapped and with wrapper prefixes stripped."""
    sd = unwrap_state_dict(load_weights(path), path, wrapper_key)
    for prefix in prefixes:
        sd = strip_prefix(sd, prefix)
    return sd


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with a :class:`CheckpointError` that lists the missing,
    unexpected and mis-shaped keys (a few of each) and names ``source``."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{len(items)} {label}: {items[:5]}{more}")
        raise CheckpointError(f"{source}: the weights do not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(dict(state_dict), strict=True)


def as_path(path: str | os.PathLike) -> Path:
    return Path(os.fspath(path)).expanduser()


# ------------------------------------------------------------------------------------ diffusers folders
_LEGACY_ATTN = re.compile(r"^(.*)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _weights_file(unet_dir: Path) -> Path | list[Path]:
    """The weights file(s) of a diffusers model folder, safetensors preferred; sharded indexes resolved."""
    for stem in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        index = unet_dir / f"{stem}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"cannot read the shard index {index}: {e}") from e
            return [unet_dir / s for s in shards]
        if (unet_dir / stem).is_file():
            return unet_dir / stem
    found = sorted(p.name for p in unet_dir.iterdir()) if unet_dir.is_dir() else []
    raise CheckpointError(f"no diffusion_pytorch_model.safetensors or .bin in {unet_dir} (found: {found})")


def unet_dir_of(folder: str | os.PathLike) -> Path:
    """``folder/unet`` for a pipeline folder, ``folder`` itself for a bare model folder."""
    root = as_path(folder)
    if not root.is_dir():
        raise CheckpointError(f"diffusers folder not found: {root} (expected unet/ with config.json and weights)")
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    if not (unet_dir / "config.json").is_file():
        raise CheckpointError(
            f"no config.json in {unet_dir}: not a diffusers UNet2DModel folder "
            "(google/ddpm-cifar10-32 layout: unet/config.json + unet/diffusion_pytorch_model.*)"
        )
    return unet_dir


def load_unet_folder(folder: str | os.PathLike) -> tuple[UNet2DModel, dict]:
    """A strictly loaded ``UNet2DModel`` and the DDPM schedule overrides found in ``scheduler/`` (may be empty)."""
    unet_dir = unet_dir_of(folder)
    try:
        config = json.loads((unet_dir / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{unet_dir / 'config.json'} is not valid JSON: {e}") from e
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CheckpointError(f"{unet_dir} holds a {config['_class_name']}, not a UNet2DModel")
    try:
        unet = UNet2DModel.from_config(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot build a UNet2DModel from {unet_dir / 'config.json'}: {e}") from e
    files = _weights_file(unet_dir)
    state: dict = {}
    for f in files if isinstance(files, list) else [files]:
        state.update(read_state_dict(f, prefixes=()))
    state = rename_legacy_attention(state, set(unet.state_dict()))
    load_strict(unet, state, files if not isinstance(files, list) else unet_dir)
    return unet.eval(), read_scheduler_config(as_path(folder))


def rename_legacy_attention(state: dict, model_keys: set[str]) -> dict:
    """Pre-0.15 diffusers attention names (``query``, ``key``, ``value``, ``proj_attn``) → the current ones, where
    the model has the renamed key and the file does not."""
    out = {}
    for k, v in state.items():
        m = _LEGACY_ATTN.match(k)
        new = f"{m.group(1)}.{_LEGACY_NAMES[m.group(2)]}.{m.group(3)}" if m else k
        out[new if new in model_keys and new not in state else k] = v
    return out


def read_scheduler_config(root: Path) -> dict:
    """``num_train_timesteps`` and ``beta_*`` from ``root/scheduler/scheduler_config.json`` if present."""
    path = root / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if cfg.get("trained_betas") is not None:
        raise CheckpointError(f"{path}: trained_betas schedules are not supported (only beta_schedule)")
    return {k: cfg[k] for k in DDPM_DEFAULTS if k in cfg}
