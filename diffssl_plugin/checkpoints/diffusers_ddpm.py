"""A diffusers DDPM folder (the ``google/ddpm-cifar10-32`` layout) loaded as a DDAE backbone, and DDAE's
block/timestep names translated to ours.

**Folder layout.** ``unet/`` (or a bare U-Net folder) and an optional ``scheduler/``, read by
:func:`diffssl_plugin.weights.load_unet_folder` (which describes the layout): the weights go through
:func:`diffssl_plugin.io.load_weights` and load with ``strict=True``, pre-0.15 attention names renamed. We do
not go through ``UNet2DModel.from_pretrained`` because diffusers only *warns* about weights missing from the
file and initialises them randomly, and reports a refused pickle as a generic "unable to load weights"; a
reproduction must fail loudly instead.

**DDAE's names.** DDAE (``FutureXiang/ddae``, ``linear.py``) hooks every up-path residual block and calls the
outputs ``out_1 … out_K`` in forward order from the bottleneck, after the block's attention where it has one,
before any upsampler. In a diffusers U-Net the up path has ``layers_per_block + 1`` residual blocks per level,
so (with ``n = layers_per_block + 1``)::

    out_k  ↔  up{i}.{j}   with  i = (k - 1) // n,  j = (k - 1) % n      (k = i·n + j + 1)

For the DDPM CIFAR-10 U-Net (``cifar10_ddpm`` preset = ``google/ddpm-cifar10-32`` = DDAE's ``DDPM_ddpm``
35.7M network; n = 3; papers.md §2.5):

=========  ==============  ==================================
DDAE       ours            map
=========  ==============  ==================================
out_1–3    up0.0–up0.2     256 ch, 4×4
out_4–6    up1.0–up1.2     256 ch, 8×8  (**out_6 = up1.2**: last 8×8 block before the upsampler)
out_7–9    up2.0–up2.2     256 ch, 16×16, after attention
out_10–12  up3.0–up3.2     128 ch, 32×32
=========  ==============  ==================================

**Timesteps.** DDAE counts DDPM timesteps from 1 (``ᾱ_t = ∏_{s=1..t} (1 - β_s)``); ours are 0-indexed
diffusers timesteps (``ᾱ_t = ∏_{s=0..t}``), so DDAE's ``t`` is our ``t - 1``: DDAE's chosen ``t = 11`` is our
``10`` (``sqrt(1 - ᾱ) = 0.0468`` either way). DDAE also feeds ``t / 1000`` to its own U-Net's sinusoid; that is a
property of DDAE's network code, not of the noise level, and does not apply to diffusers weights.
Note that ``google/ddpm-cifar10-32`` holds the DDPM paper's weights (Ho et al.), not DDAE's own checkpoints
(DDAE's repo numbers, e.g. 90.05%, come from its re-trained network).
"""

from __future__ import annotations

import os
import re

import torch

from ..errors import InputError
from ..weights import load_unet_folder

_OUT = re.compile(r"^out_(\d+)$")
_UP = re.compile(r"^up(\d+)\.(\d+)$")

#: DDAE's chosen layer and DDPM timestep for CIFAR-10 (config ``DDPM_ddpm``, papers.md §2.5), in DDAE's names.
DDAE_CIFAR10_BLOCK = "out_6"
DDAE_CIFAR10_T = 11


def ddae_block_name(out_name: str, layers_per_block: int, num_levels: int | None = None) -> str:
    """DDAE's hook name ``out_k`` → our block name ``up{i}.{j}`` (see the module docstring).

    ``layers_per_block`` is the U-Net's (diffusers') value; ``num_levels`` (the number of up blocks), when given,
    bounds ``k``."""
    m = _OUT.match(out_name)
    if not m or int(m.group(1)) < 1:
        raise InputError(f"{out_name!r} is not a DDAE block name; DDAE names are out_1, out_2, … (1-based)")
    k, n = int(m.group(1)), layers_per_block + 1
    if num_levels is not None and k > num_levels * n:
        raise InputError(f"{out_name} does not exist: this U-Net has out_1 … out_{num_levels * n}")
    return f"up{(k - 1) // n}.{(k - 1) % n}"


def ddae_out_name(block: str, layers_per_block: int) -> str:
    """Our ``up{i}.{j}`` → DDAE's ``out_k`` (the inverse of :func:`ddae_block_name`)."""
    m = _UP.match(block)
    if not m or int(m.group(2)) > layers_per_block:
        raise InputError(
            f"{block!r} has no DDAE name: DDAE names only the up-path residual blocks up{{i}}.{{j}} "
            f"(j ≤ {layers_per_block})"
        )
    return f"out_{int(m.group(1)) * (layers_per_block + 1) + int(m.group(2)) + 1}"


def ddae_timestep(t: int) -> int:
    """DDAE's 1-based DDPM timestep → our 0-indexed one (DDAE's ``t = 11`` is our ``10``)."""
    if isinstance(t, bool) or not float(t).is_integer() or int(t) < 1:
        raise InputError(f"DDAE timesteps are integers 1 … T, got {t!r}")
    return int(t) - 1


def load_diffusers_ddpm(
    folder: str | os.PathLike,
    block: str = DDAE_CIFAR10_BLOCK,
    timestep: int = DDAE_CIFAR10_T - 1,
    device: str | torch.device | None = None,
    **kwargs,
):
    """A diffusers DDPM folder as a :class:`~diffssl_plugin.backbones.DDAEBackbone`.

    ``block`` is one of our block names or a DDAE name ``out_k`` (translated with :func:`ddae_block_name`);
    ``timestep`` is *ours* (0-indexed; use :func:`ddae_timestep` for DDAE's). The defaults are DDAE's CIFAR-10
    choice, ``out_6`` at DDAE ``t = 11``. ``device``: where the U-Net goes *before* ``DDAEBackbone`` probes its
    block shapes with one forward. Other ``kwargs`` go to ``DDAEBackbone`` (``pool``, ``noise_seed``, …).
    """
    from ..backbones.ddae import DDAEBackbone

    unet, sched = load_unet_folder(folder)
    if device is not None:
        unet = unet.to(device)
    if _OUT.match(str(block)):
        block = ddae_block_name(block, int(unet.config.layers_per_block), len(unet.up_blocks))
    return DDAEBackbone(unet=unet, scheduler_config=sched, block=block, timestep=timestep, **kwargs).eval()
