"""DDAE's own checkpoints (``FutureXiang/ddae``, ``train.py``) → a diffusers U-Net, read as a ``DDAEBackbone``.

**Scope: the DDPM-architecture networks trained with DDAE's DDPM framework** (config ``DDPM_ddpm``: the 35.7M
CIFAR-10 U-Net, ``use_res_for_updown=False``). Out of scope, and refused where the weights show it: DDPM++
networks (``DDPM_ddpmpp``, ``EDM_ddpmpp``: ResBlock up/down-sampling, ``down.N.op.*`` keys) and networks with
EDM augmentation labels (``time_emb.aug_emb``). An EDM-trained DDPM network (``EDM_ddpm``) has the *same keys*
and cannot be told apart from the weights; it is out of scope too (its time input is ``ln(σ)/4`` and its output is
preconditioned), so do not load one with this kind.

**File.** ``train.py`` saves ``torch.save({'MODEL': diff.state_dict(), 'EMA': ema.state_dict(), 'opt':
optim.state_dict()})`` where ``diff`` is the ``DDPM`` wrapper (the U-Net is its ``nn_model``) under DDP and
``ema`` is ``ema_pytorch.EMA(diff)``. DDAE's ``linear.py`` probes ``ema.ema_model``, so by default we read the
``'EMA'`` entry's ``ema_model.nn_model.*`` keys (ignoring ``ema_pytorch``'s ``initted``/``step`` buffers and any
``online_model.*`` copy); ``weights="model"`` reads ``'MODEL'`` (``module.nn_model.*``) instead. The file is
read with ``torch.load(weights_only=True)`` (:func:`diffssl_plugin.io.load_weights`): a pickle that needs code
is refused with a ``CheckpointError`` naming the file.

**Architecture** (DDAE's ``model/unet.py``, ``model/block.py``, ``model/DDPM.py`` and ``train.py``, read in the
code index at commits d19748b/e0c3236; papers.md §2.2): the classic DDPM U-Net, but *not* in pytorch-ddpm's
naming (``head``/``downblocks``/``tail``/``proj_q``): the key names below are those of DDAE's own ``UNet``.
Differences from our ``cifar10_ddpm`` preset (issue 15, item 4), each reproduced here:

* output GroupNorm with **8** groups (everything else uses 32): diffusers ties ``conv_norm_out`` to
  ``norm_num_groups``, so :class:`~.ddae_official_unet.DDAEUNet2DModel` replaces it (config ``norm_out_groups``);
* down-sampling: a stride-2 3×3 conv with **padding 1** (``downsample_padding=1``; the preset pads (0, 1, 0, 1));
* GroupNorm **eps 1e-5** (``nn.GroupNorm``'s default; the preset has 1e-6);
* time input **t / n_T** with DDAE's t = ours + 1: :class:`~.ddae_official_unet.DDAETimeInput` feeds diffusers' sinusoid
  ``(t + time_offset) / time_scale`` for our 0-indexed t (config ``time_offset=1``, ``time_scale=1000``).

Facts read from the code (the issue's list does not state them): the sinusoid has dim C = ``n_channels`` with
frequencies ``exp(-ln(10000)·i / (C/2 − 1))`` and ``[sin, cos]`` order (diffusers ``freq_shift=1,
flip_sin_to_cos=False``); the time MLP is Linear(C, 4C) → SiLU → Linear(4C, 4C); the ResBlock *adds*
Linear(SiLU(emb)) after conv1 (diffusers' "default" time norm); dropout sits before conv2; attention is
single-head (``AttentionBlock(n_channels)``, n_heads=1), GroupNorm(32) → one Linear(C, 3C) → softmax(q·k/√C) →
Linear(C, C), residual; up-sampling is nearest ×2 then a 3×3 conv; skips are ``cat([h, skip])``.

**Key mapping** (DDAE → diffusers; ``L`` levels, ``R = n_blocks``; DDAE numbers ``down.n``/``up.n`` in
forward order, resamplers included):

=============================================  ===============================================
``image_proj``                                 ``conv_in``
``time_emb.lin1`` / ``time_emb.lin2``          ``time_embedding.linear_1`` / ``linear_2``
``down.{l(R+1) + j}.res`` / ``.attn``          ``down_blocks.{l}.resnets.{j}`` / ``attentions.{j}``
``down.{l(R+1) + R}.conv`` (l < L-1)           ``down_blocks.{l}.downsamplers.0.conv``
``middle.res1`` / ``middle.attn`` / ``.res2``  ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``
``up.{i(R+2) + j}.res`` / ``.attn``            ``up_blocks.{i}.resnets.{j}`` / ``attentions.{j}``
``up.{i(R+2) + R+1}.conv`` (i < L-1)           ``up_blocks.{i}.upsamplers.0.conv``
``norm`` / ``final``                           ``conv_norm_out`` (8 groups) / ``conv_out``
ResBlock ``norm1`` / ``conv1`` / ``norm2``     ``norm1`` / ``conv1`` / ``norm2``
``time_emb.1`` / ``conv2.1`` / ``shortcut``    ``time_emb_proj`` / ``conv2`` / ``conv_shortcut``
attention ``norm`` / ``output``                ``group_norm`` / ``to_out.0``
attention ``projection`` rows 0:C, C:2C, 2C:3C ``to_q`` / ``to_k`` / ``to_v``
=============================================  ===============================================

(The level index above counts the levels of DDAE's down path with l; the up path's i counts from the bottom,
as diffusers' ``up_blocks`` do. The index formulas assume a down-sampler after every level but the last.)
DDAE's hook names ``out_k`` and timesteps map to ours as in :mod:`.diffusers_ddpm` (``out_6`` at t = 11 is
``up1.2`` at 10). Unsure (not in DDAE's repo): ``ema_pytorch``'s state-dict layout, which DDAE does not pin;
we assume ``ema_model.*`` plus the ``initted``/``step`` buffers, with or without an ``online_model.*`` copy
(versions differ), and refuse any other key beside them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, InputError
from ..io import load_weights
from ..weights import load_strict
from .ddae_official_unet import DDAEUNet2DModel
from .diffusers_ddpm import _OUT, DDAE_CIFAR10_BLOCK, DDAE_CIFAR10_T, ddae_block_name

#: where each entry of DDAE's train.py checkpoint keeps the U-Net's weights
_PREFIXES = {"ema": ("EMA", ("ema_model.nn_model.",)), "model": ("MODEL", ("module.nn_model.", "nn_model."))}
_EMA_EXTRAS = re.compile(r"^(initted|step|online_model\..*)$")


# ---------------------------------------------------------------------- the configuration
@dataclass(frozen=True)
class DDAEConfig:
    """DDAE's ``UNet`` arguments (its config names) and its DDPM ``n_T``; the default is ``DDPM_ddpm``."""

    image_shape: tuple[int, int, int] = (3, 32, 32)
    n_channels: int = 128
    ch_mults: tuple[int, ...] = (1, 2, 2, 2)
    is_attn: tuple[bool, ...] = (False, True, False, False)
    n_blocks: int = 2
    dropout: float = 0.1
    n_T: int = 1000

    @property
    def channels(self) -> list[int]:
        return [self.n_channels * m for m in self.ch_mults]


def infer_ddae_config(
    state_dict: Mapping[str, torch.Tensor],
    image_size: int = 32,
    dropout: float = 0.1,
    n_T: int = 1000,
    source: str = "DDAE state dict",
) -> DDAEConfig:
    """The :class:`DDAEConfig` of a DDAE U-Net state dict (``image_proj.weight``, ``down.N.*``, … keys).

    The image size, dropout and ``n_T`` are not in the weights; they default to ``DDPM_ddpm``'s."""
    if "image_proj.weight" not in state_dict or "final.weight" not in state_dict:
        raise CheckpointError(
            f"{source}: not a DDAE U-Net (no image_proj.weight / final.weight; keys: {sorted(state_dict)[:8]})"
        )
    if any(k.startswith("time_emb.aug_emb.") for k in state_dict):
        raise CheckpointError(f"{source}: an EDM network with augmentation labels (time_emb.aug_emb) is out of scope")
    n_channels, in_ch = state_dict["image_proj.weight"].shape[:2]
    levels: list[list[tuple[int, bool]]] = [[]]
    n = 0
    while any(k.startswith(f"down.{n}.") for k in state_dict):
        if f"down.{n}.res.conv1.weight" in state_dict:
            out_ch = int(state_dict[f"down.{n}.res.conv1.weight"].shape[0])
            levels[-1].append((out_ch, f"down.{n}.attn.norm.weight" in state_dict))
        elif f"down.{n}.conv.weight" in state_dict:
            levels.append([])
        elif any(k.startswith(f"down.{n}.op.") for k in state_dict):
            raise CheckpointError(
                f"{source}: down.{n} is a ResBlock down-sampler (use_res_for_updown=True, a DDPM++ network); "
                "only DDAE's DDPM-architecture networks are supported"
            )
        else:
            raise CheckpointError(f"{source}: down.{n} is neither a ResAttBlock nor a Downsample conv")
        n += 1
    n_blocks = len(levels[0])
    if n_blocks == 0 or any(len(lv) != n_blocks for lv in levels):
        raise CheckpointError(
            f"{source}: unexpected architecture: {[len(lv) for lv in levels]} residual blocks per level "
            "(DDAE's U-Net has the same n_blocks at every level and a Downsample between levels)"
        )
    mults, attn = [], []
    for level, blocks in enumerate(levels):
        (out_ch, has_attn), *_ = blocks
        if out_ch % n_channels or any(b != blocks[0] for b in blocks):
            raise CheckpointError(f"{source}: unexpected architecture at level {level}: blocks {blocks}")
        mults.append(out_ch // n_channels)
        attn.append(has_attn)
    return DDAEConfig(
        image_shape=(int(in_ch), image_size, image_size),
        n_channels=int(n_channels),
        ch_mults=tuple(mults),
        is_attn=tuple(attn),
        n_blocks=n_blocks,
        dropout=dropout,
        n_T=n_T,
    )


def ddae_unet_config(cfg: DDAEConfig) -> dict:
    """The :class:`DDAEUNet2DModel` config with DDAE's architecture (see the module docstring)."""
    if cfg.ch_mults[0] != 1:
        raise InputError(
            f"ch_mults must start with 1 (got {cfg.ch_mults}): diffusers sizes the time sinusoid by the first "
            "level's channels, DDAE by n_channels"
        )
    for level, ch in enumerate(cfg.channels):
        if ch % 32:
            raise InputError(f"level {level} has {ch} channels, not a multiple of DDAE's 32 GroupNorm groups")
    if cfg.n_channels % 8:
        raise InputError(f"n_channels={cfg.n_channels} is not a multiple of the output GroupNorm's 8 groups")
    levels = range(len(cfg.ch_mults))
    return {
        "sample_size": cfg.image_shape[1],
        "in_channels": cfg.image_shape[0],
        "out_channels": cfg.image_shape[0],
        "block_out_channels": tuple(cfg.channels),
        "layers_per_block": cfg.n_blocks,
        "down_block_types": tuple("AttnDownBlock2D" if cfg.is_attn[lv] else "DownBlock2D" for lv in levels),
        "up_block_types": tuple("AttnUpBlock2D" if cfg.is_attn[lv] else "UpBlock2D" for lv in reversed(levels)),
        "mid_block_type": "UNetMidBlock2D",
        "add_attention": True,
        "downsample_padding": 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "attention_head_dim": None,
        "act_fn": "silu",
        "time_embedding_type": "positional",
        "resnet_time_scale_shift": "default",
        "dropout": cfg.dropout,
        "norm_out_groups": 8,
        "time_offset": 1.0,
        "time_scale": float(cfg.n_T),
    }


# ---------------------------------------------------------------------- the key mapping
def _module_plan(cfg: DDAEConfig) -> list[tuple[str, str, str]]:
    """(DDAE module, diffusers module, kind) for every parametrised module; kind: 'plain', 'res' or 'attn'."""
    L, R = len(cfg.ch_mults), cfg.n_blocks
    plan = [
        ("image_proj", "conv_in", "plain"),
        ("time_emb.lin1", "time_embedding.linear_1", "plain"),
        ("time_emb.lin2", "time_embedding.linear_2", "plain"),
    ]
    n = 0
    for level in range(L):
        for j in range(R):
            plan.append((f"down.{n}.res", f"down_blocks.{level}.resnets.{j}", "res"))
            if cfg.is_attn[level]:
                plan.append((f"down.{n}.attn", f"down_blocks.{level}.attentions.{j}", "attn"))
            n += 1
        if level < L - 1:
            plan.append((f"down.{n}.conv", f"down_blocks.{level}.downsamplers.0.conv", "plain"))
            n += 1
    plan += [
        ("middle.res1", "mid_block.resnets.0", "res"),
        ("middle.attn", "mid_block.attentions.0", "attn"),
        ("middle.res2", "mid_block.resnets.1", "res"),
    ]
    n = 0
    for i, level in enumerate(reversed(range(L))):
        for j in range(R + 1):
            plan.append((f"up.{n}.res", f"up_blocks.{i}.resnets.{j}", "res"))
            if cfg.is_attn[level]:
                plan.append((f"up.{n}.attn", f"up_blocks.{i}.attentions.{j}", "attn"))
            n += 1
        if level > 0:
            plan.append((f"up.{n}.conv", f"up_blocks.{i}.upsamplers.0.conv", "plain"))
            n += 1
    return [*plan, ("norm", "conv_norm_out", "plain"), ("final", "conv_out", "plain")]


_RES_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "time_emb.1": "time_emb_proj",
    "norm2": "norm2",
    "conv2.1": "conv2",
    "shortcut": "conv_shortcut",
}


def convert_ddae_state_dict(
    state_dict: Mapping[str, torch.Tensor], cfg: DDAEConfig, source: str = "DDAE state dict"
) -> dict[str, torch.Tensor]:
    """A DDAE ``UNet`` state dict → the state dict of ``DDAEUNet2DModel(**ddae_unet_config(cfg))``.

    Every DDAE key must be used and every module of the plan present, else :class:`CheckpointError` lists them;
    tensors are cast to float32."""
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []

    def move(src: str, dst: str) -> None:
        for p in ("weight", "bias"):
            if f"{src}.{p}" in sd:
                out[f"{dst}.{p}"] = sd[f"{src}.{p}"]
                used.add(f"{src}.{p}")
            else:
                missing.append(f"{src}.{p}")

    for src, dst, kind in _module_plan(cfg):
        if kind == "plain":
            move(src, dst)
        elif kind == "res":
            for part, new in _RES_PARTS.items():
                if part == "shortcut" and f"{src}.shortcut.weight" not in sd:
                    continue  # identity shortcut; load_strict reports it if diffusers expects a conv
                move(f"{src}.{part}", f"{dst}.{new}")
        else:  # single-head attention
            move(f"{src}.norm", f"{dst}.group_norm")
            move(f"{src}.output", f"{dst}.to_out.0")
            w, b = sd.get(f"{src}.projection.weight"), sd.get(f"{src}.projection.bias")
            if w is None or b is None:
                missing.append(f"{src}.projection.weight/bias")
                continue
            c = w.shape[1]
            if w.shape != (3 * c, c) or b.shape != (3 * c,):
                raise CheckpointError(
                    f"{source}: {src}.projection.weight has shape {tuple(w.shape)}, expected (3C, C) of a "
                    "single-head AttentionBlock"
                )
            used.update({f"{src}.projection.weight", f"{src}.projection.bias"})
            for k, name in enumerate(("to_q", "to_k", "to_v")):
                out[f"{dst}.{name}.weight"] = w[k * c : (k + 1) * c].contiguous()
                out[f"{dst}.{name}.bias"] = b[k * c : (k + 1) * c].contiguous()
    unused = sorted(set(sd) - used)
    if missing or unused:
        parts = [
            f"{len(x)} {what}: {x[:5]}" + (f" (+{len(x) - 5} more)" if len(x) > 5 else "")
            for what, x in (("missing DDAE keys", missing), ("unmapped keys", unused))
            if x
        ]
        raise CheckpointError(f"{source} does not match the DDAE config {cfg}: " + "; ".join(parts))
    return out


def ddae_to_unet(
    state_dict: Mapping[str, torch.Tensor], cfg: DDAEConfig, source: str = "DDAE state dict"
) -> DDAEUNet2DModel:
    """A :class:`DDAEUNet2DModel` with DDAE's architecture, strictly loaded from a DDAE ``UNet`` state dict."""
    unet = DDAEUNet2DModel(**ddae_unet_config(cfg))
    load_strict(unet, convert_ddae_state_dict(state_dict, cfg, source), source)
    return unet.eval()


# ---------------------------------------------------------------------- loading
def read_ddae_state_dict(path: str | os.PathLike, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The U-Net's state dict from DDAE's ``train.py`` checkpoint: the ``'EMA'`` entry's ``ema_model.nn_model.*``
    (``weights="ema"``, what DDAE's probe reads) or ``'MODEL'``'s ``module.nn_model.*`` (``weights="model"``)."""
    if weights not in _PREFIXES:
        raise InputError(f"weights must be 'ema' or 'model', got {weights!r}")
    entry, prefixes = _PREFIXES[weights]
    obj = load_weights(path)
    if not isinstance(obj, Mapping) or entry not in obj:
        found = sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path}: no {entry!r} entry (found: {found}); DDAE's train.py saves a dict with 'MODEL', 'EMA' and 'opt'"
        )
    sd = obj[entry]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: {entry!r} is not a state dict (a mapping of names to tensors)")
    prefix = next((p for p in prefixes if any(str(k).startswith(p) for k in sd)), None)
    if prefix is None:
        raise CheckpointError(f"{path}: no {' or '.join(prefixes)}* keys in {entry!r} (keys: {sorted(sd)[:8]})")
    strays = [k for k in sd if not k.startswith(prefix) and not (weights == "ema" and _EMA_EXTRAS.match(k))]
    if strays:
        raise CheckpointError(f"{path}: unexpected keys in {entry!r} beside {prefix}*: {sorted(strays)[:5]}")
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def load_ddae_unet(
    path: str | os.PathLike, weights: str = "ema", image_size: int = 32, dropout: float = 0.1, n_T: int = 1000
) -> DDAEUNet2DModel:
    """DDAE's ``train.py`` checkpoint as a :class:`DDAEUNet2DModel` (architecture read from the weights)."""
    sd = read_ddae_state_dict(path, weights)
    cfg = infer_ddae_config(sd, image_size=image_size, dropout=dropout, n_T=n_T, source=str(path))
    return ddae_to_unet(sd, cfg, source=str(path))


def load_ddae_ddpm(
    path: str | os.PathLike,
    block: str = DDAE_CIFAR10_BLOCK,
    timestep: int = DDAE_CIFAR10_T - 1,
    weights: str = "ema",
    image_size: int = 32,
    n_T: int = 1000,
    dynamic_img_size: bool = True,
    device: str | torch.device | None = None,
    **kwargs,
):
    """DDAE's own DDPM checkpoint (``model_{epoch}.pth`` of ``train.py``) as a ``DDAEBackbone``.

    ``block``: one of our names or DDAE's ``out_k``; ``timestep``: *ours* (0-indexed; DDAE's t = ours + 1), both
    defaulting to DDAE's CIFAR-10 choice (``out_6`` at DDAE t = 11). The noise schedule is DDAE's (linear
    1e-4 … 0.02 over ``n_T`` steps). ``image_size`` (not stored in the file) sets the backbone's nominal input
    size; the network is fully convolutional and ``dynamic_img_size`` (default on) accepts other multiples
    of its stride. Other ``kwargs`` go to ``DDAEBackbone`` (``pool``, ``noise_seed``, …).
    """
    from ..backbones.ddae import DDAEBackbone

    unet = load_ddae_unet(path, weights=weights, image_size=image_size, n_T=n_T)
    if device is not None:
        unet = unet.to(device)
    if _OUT.match(str(block)):
        block = ddae_block_name(block, int(unet.config.layers_per_block), len(unet.up_blocks))
    return DDAEBackbone(
        unet=unet,
        scheduler_config={"num_train_timesteps": n_T},
        block=block,
        timestep=timestep,
        dynamic_img_size=dynamic_img_size,
        **kwargs,
    ).eval()
