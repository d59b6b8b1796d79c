"""Pooling of feature maps into vectors: ``"avg"`` (global average), ``"avgKxK"`` (adaptive K×K average,
flattened), ``"none"`` (the map itself)."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ..errors import InputError

_ADAPTIVE = re.compile(r"^avg(\d+)x(\d+)$")


def pool_cells(pool: str) -> int | None:
    """How many spatial cells a pooling keeps per channel (None for ``"none"``); validates the name."""
    if pool == "avg":
        return 1
    if pool == "none":
        return None
    m = _ADAPTIVE.match(pool)
    if not m or m.group(1) != m.group(2) or int(m.group(1)) < 1:
        raise InputError(f"unknown pooling {pool!r}; valid: 'avg', 'avgKxK' (e.g. 'avg2x2'), 'none'")
    return int(m.group(1)) ** 2


def pool_features(x: torch.Tensor, pool: str) -> torch.Tensor:
    """Pool an NCHW map: (B, C) for ``avg``, (B, C·K²) for ``avgKxK``, unchanged for ``none``."""
    cells = pool_cells(pool)
    if cells is None:
        return x
    if cells == 1:
        return x.float().mean(dim=(2, 3))
    k = int(cells**0.5)
    return F.adaptive_avg_pool2d(x.float(), k).flatten(1)


def pooled_dim(channels: int, pool: str) -> int:
    cells = pool_cells(pool)
    if cells is None:
        raise InputError("pool='none' has no vector size")
    return channels * cells
