"""A diffusers DDPM folder (the ``google/ddpm-cifar10-32`` layout) loaded as a DDAE backbone, and DDAE's
block/timestep names translated to ours.

**Folder layout.** ``model_index.json`` (optional), ``unet/config.json`` + ``unet/diffusion_pytorch_model.
{safetensors,bin}`` (or a sharded ``*.index.json``), ``scheduler/scheduler_config.json`` (optional: the DDPM
paper's linear schedule is the default). A bare U-Net folder (``config.json`` + weights) loads too.

The weights are read with :func:`diffssl_plugin.io.load_weights` and loaded with ``strict=True``. Folders
written by diffusers before 0.15 (``google/ddpm-cifar10-32`` among them) name the attention projections
``query``/``key``/``value``/``proj_attn``; they are renamed to ``to_q``/``to_k``/``to_v``/``to_out.0`` as diffusers
itself does on load (``ModelMixin._fix_state_dict_keys_on_load``). We do not go
through ``UNet2DModel.from_pretrained`` (nor ``DDAEBackbone.from_diffusers``, which uses it) because diffusers
only *warns* about weights missing from the file and initialises them randomly, and reports a refused pickle
as a generic "unable to load weights"; a reproduction must fail loudly instead.

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

import json
import os
import re
from pathlib import Path

import torch
from diffusers import UNet2DModel

from ..diffusion.schedule import DDPM_DEFAULTS
from ..errors import CheckpointError, InputError
from .common import as_path, load_strict, read_state_dict

_OUT = re.compile(r"^out_(\d+)$")
_LEGACY_ATTN = re.compile(r"^(.*)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
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
        raise InputError(f"{block!r} has no DDAE name: DDAE names only the up-path residual blocks up{{i}}.{{j}} "
                         f"(j ≤ {layers_per_block})")
    return f"out_{int(m.group(1)) * (layers_per_block + 1) + int(m.group(2)) + 1}"


def ddae_timestep(t: int) -> int:
    """DDAE's 1-based DDPM timestep → our 0-indexed one (DDAE's ``t = 11`` is our ``10``)."""
    if isinstance(t, bool) or not float(t).is_integer() or int(t) < 1:
        raise InputError(f"DDAE timesteps are integers 1 … T, got {t!r}")
    return int(t) - 1


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
        raise CheckpointError(f"no config.json in {unet_dir}: not a diffusers UNet2DModel folder "
                              "(google/ddpm-cifar10-32 layout: unet/config.json + unet/diffusion_pytorch_model.*)")
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


def load_diffusers_ddpm(folder: str | os.PathLike, block: str = DDAE_CIFAR10_BLOCK,
                        timestep: int = DDAE_CIFAR10_T - 1, device: str | torch.device | None = None, **kwargs):
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
