"""Shared pieces of the checkpoint loaders: read a state dict safely, unwrap it, load it strictly.

Every file goes through :func:`diffssl_plugin.io.load_weights` (safetensors, or ``torch.load`` with
``weights_only=True``), so a pickle that needs code to load is refused and a truncated file names itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..io import load_weights

# Keys under which training scripts commonly nest the weights in a checkpoint dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "netE", "ema", "module")


def is_state_dict(obj: object) -> bool:
    """A non-empty mapping of string names to tensors."""
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def unwrap_state_dict(obj: object, path: str | os.PathLike, wrapper_key: str | None = None
                      ) -> dict[str, torch.Tensor]:
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
        raise CheckpointError(f"{path}: no state dict found (top-level keys: {keys}); pass wrapper_key= to "
                              "name the entry that holds the weights")
    raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), got "
                          f"{type(obj).__name__}")


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from every key if *all* keys carry it (``nn.DataParallel``/DDP save ``module.``)."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def read_state_dict(path: str | os.PathLike, wrapper_key: str | None = None,
                    prefixes: tuple[str, ...] = ("module.",)) -> dict[str, torch.Tensor]:
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
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
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
