"""Reproducible extraction noise: ε for each (seed, timestep, image index), independent across all three.

DDAE and diffssl draw fresh noise per image, per forward and per timestep. A fixed-seed evaluation keeps that
independence and stays reproducible by making ε a function of ``(seed, t, index)`` alone, where ``index`` is
the image's position in its dataset: the same image gets the same ε whatever the batch size, the sharding
across processes or the out-of-memory back-off, and no two images or timesteps share one.

The draw is a counter-based generator written in integer tensor ops (no ``torch.Generator``, no host sync, the
same bits on every device): a 32-bit key hashed from (seed, t, index) with Wellons' ``lowbias32`` integer hash,
mixed with each element's position, 23 bits turned into a uniform in (0, 1) and mapped through the normal
inverse CDF (``torch.special.ndtri``). |ε| is therefore bounded by about 5.3 (a 2⁻²⁴ tail): our choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 hash of uint32 values held in int64 (products wrap; the mask keeps the low 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def indexed_noise(
    seed: int,
    timestep: int,
    index: torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal ε of shape (len(index), *shape) on ``index``'s device: row i is a function of
    (``seed``, ``timestep``, ``index[i]``) only (see the module docstring)."""
    index = index.to(torch.int64).flatten()
    key = _mix32(torch.full_like(index, seed & _MASK))
    key = _mix32(key ^ (timestep & _MASK))
    key = _mix32(key ^ (index & _MASK))
    key = _mix32(key ^ ((index >> 32) & _MASK))
    numel = 1
    for s in shape:
        numel *= int(s)
    elem = _mix32(torch.arange(numel, device=index.device, dtype=torch.int64) * 0x9E3779B9 & _MASK)
    bits = _mix32(key[:, None] ^ elem[None, :])
    # 23 bits: (k + ½)/2²³ is exact in float32 and strictly inside (0, 1) (with 24 bits the top value rounds to 1)
    u = ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / 2**23)
    return torch.special.ndtri(u).view(len(index), *shape).to(dtype)
