"""MDSM's official checkpoints (``zengyi-li/MDSM``, ``models/ResNet.py``) loaded into our
:class:`~diffssl_plugin.backbones.ebm.EnergyResNet`.

The official ``train.py`` saves ``netE.state_dict()`` of an ``nn.DataParallel`` model (2 GPUs), so every key
starts with ``module.`` (papers.md §4.7); a plain state dict or one nested under a key (``state_dict``,
``model``, ``netE``, …) loads too. The official module names differ from ours:

==========================================  ==========================================
official (``Res18_Quadratic``)               ours (``EnergyResNet``)
==========================================  ==========================================
``conv1.conv``                               ``stem``
``rb{s}`` (s = 1, 2, 3: the down block)      ``stages.{s-1}.0``
``rbc{s}``, ``rbc{ss}`` (Res12: ``rbc{s}``)  ``stages.{s-1}.1``, ``stages.{s-1}.2``
 ↳ ``conv_1.conv``                           ↳ ``conv1`` (3×3, no bias)
 ↳ ``conv_2.conv`` / down: ``conv_2.conv.conv``   ↳ ``conv2`` (``ConvMeanPool``: conv, then 2×2 mean)
 ↳ ``conv_shortcut.conv`` / down: ``conv_shortcut.conv.conv``  ↳ ``shortcut`` (``MeanPoolConv``: mean, then conv)
 ↳ ``bn1``, ``bn2`` (LayerNorm)              dropped (see below)
``ln1``, ``ln2``, ``lq``                     ``energy_head.lin1``, ``lin2``, ``quad``
==========================================  ==========================================

Mismatch to know about: the official ``ResidualBlock`` creates two ``LayerNorm([C, hw, hw])`` modules in every
block even with ``normalize=False`` (the released setting), so their parameters are in the file although the
forward never uses them. They never receive a gradient, so they stay at their initial value (weight 1, bias
0); we drop them after checking exactly that, and refuse a checkpoint whose norms were changed (a
``normalize=True`` network, which EnergyResNet does not implement). The official 2×2 mean pool (the average of
the four strided slices) equals ``avg_pool2d(2)`` on the even-sized maps these networks have.

The network's size is read from the weights: ``width`` from the stem, ``blocks_per_stage`` from the block names,
``in_chans`` from the stem, ``net_size`` from the energy head. ``img_size`` defaults to 28 for 1-channel
networks (the paper pads 28×28 (F)MNIST to 32×32 before noising; the network takes either size) and to
``net_size`` otherwise.
"""

from __future__ import annotations

import math
import os
import re

import torch

from ..errors import CheckpointError
from ..weights import load_strict, read_state_dict

_BLOCK = re.compile(r"^(rbc?)(\d+)\.")


def _official_block_names(stage: int, blocks_per_stage: int) -> list[str]:
    """Official block names of stage ``stage`` (1-based): ``rb1``, ``rbc1``, ``rbc11``, … (Res18's naming)."""
    return [f"rb{stage}"] + [f"rbc{str(stage) * k}" for k in range(1, blocks_per_stage)]


def infer_mdsm_args(state_dict: dict[str, torch.Tensor], source: str = "MDSM checkpoint") -> dict:
    """``EnergyResNet`` arguments (width, blocks_per_stage, in_chans, net_size) read from official weights."""
    try:
        stem = state_dict["conv1.conv.weight"]
        head = state_dict["ln1.weight"]
    except KeyError as e:
        raise CheckpointError(
            f"{source}: not an MDSM Res*_Quadratic state dict (no {e.args[0]!r}; keys start "
            f"with {sorted(state_dict)[:5]})"
        ) from None
    width, in_chans = int(stem.shape[0]), int(stem.shape[1])
    counts = {}
    for key in state_dict:
        if m := _BLOCK.match(key):
            stage = int(m.group(2)[0])
            counts.setdefault(stage, set()).add(m.group(1) + m.group(2))
    blocks = {len(v) for v in counts.values()}
    if sorted(counts) != [1, 2, 3] or len(blocks) != 1:
        raise CheckpointError(
            f"{source}: expected three stages with the same number of blocks (Res6/12/18_"
            f"Quadratic), found {dict(sorted((k, sorted(v)) for k, v in counts.items()))}"
        )
    side = math.isqrt(int(head.shape[1]) // (8 * width)) if head.shape[1] % (8 * width) == 0 else 0
    if side < 1 or 8 * width * side * side != head.shape[1]:
        raise CheckpointError(
            f"{source}: ln1.weight has {head.shape[1]} inputs, not 8·{width}·s² for a square final map"
        )
    return {"width": width, "blocks_per_stage": blocks.pop(), "in_chans": in_chans, "net_size": 8 * side}


def _infer_own_args(sd: dict[str, torch.Tensor], source: str) -> dict:
    """``EnergyResNet`` arguments read from a state dict already in our naming."""
    try:
        width, in_chans = (int(n) for n in sd["stem.weight"].shape[:2])
        blocks = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("stages.0."))
        side = math.isqrt(int(sd["energy_head.lin1.weight"].shape[1]) // (8 * width))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: has 'stem.weight' but is not an EnergyResNet state dict ({e})") from None
    return {"width": width, "blocks_per_stage": blocks, "in_chans": in_chans, "net_size": 8 * side}


def convert_mdsm_state_dict(
    state_dict: dict[str, torch.Tensor], blocks_per_stage: int, source: str = "MDSM checkpoint"
) -> dict[str, torch.Tensor]:
    """Official ``Res*_Quadratic`` names → ``EnergyResNet`` names; unused LayerNorms checked and dropped."""
    sd = dict(state_dict)
    out: dict[str, torch.Tensor] = {}

    def move(old: str, new: str) -> None:
        for p in ("weight", "bias"):
            if f"{old}.{p}" in sd:
                out[f"{new}.{p}"] = sd.pop(f"{old}.{p}")

    move("conv1.conv", "stem")
    for s in range(1, 4):
        for j, name in enumerate(_official_block_names(s, blocks_per_stage)):
            new = f"stages.{s - 1}.{j}"
            down = j == 0  # MeanPoolConv / ConvMeanPool wrap one more MyConvo2d
            move(f"{name}.conv_1.conv", f"{new}.conv1")
            move(f"{name}.conv_2.conv.conv" if down else f"{name}.conv_2.conv", f"{new}.conv2")
            move(f"{name}.conv_shortcut.conv.conv" if down else f"{name}.conv_shortcut.conv", f"{new}.shortcut")
            for norm in ("bn1", "bn2"):
                w, b = sd.pop(f"{name}.{norm}.weight", None), sd.pop(f"{name}.{norm}.bias", None)
                if (w is not None and not torch.all(w == 1)) or (b is not None and not torch.all(b == 0)):
                    raise CheckpointError(
                        f"{source}: {name}.{norm} is not the identity LayerNorm: the network was "
                        "trained with normalize=True, which EnergyResNet does not implement"
                    )
    for old, new in (("ln1", "energy_head.lin1"), ("ln2", "energy_head.lin2"), ("lq", "energy_head.quad")):
        move(old, new)
    out.update(sd)  # leftovers surface as unexpected keys in load_strict
    return out


def load_mdsm(
    path: str | os.PathLike, wrapper_key: str | None = None, device: str | torch.device | None = None, **kwargs
):
    """An official MDSM checkpoint as an :class:`~diffssl_plugin.backbones.ebm.EnergyResNet` (in eval mode).

    ``kwargs`` override the inferred arguments or set others (``img_size``, ``global_pool``, ``num_classes``).
    """
    from ..backbones.ebm import EnergyResNet

    sd = read_state_dict(path, wrapper_key=wrapper_key)
    if "stem.weight" in sd:  # already in our naming (e.g. saved from EnergyResNet, possibly DataParallel)
        args, converted = _infer_own_args(sd, str(path)), sd
    else:
        args = infer_mdsm_args(sd, str(path))
        converted = convert_mdsm_state_dict(sd, args["blocks_per_stage"], str(path))
    args["img_size"] = 28 if args["in_chans"] == 1 and args["net_size"] == 32 else args["net_size"]
    args.update(kwargs)
    model = EnergyResNet(**args)
    load_strict(model, converted, path)
    return model.to(device).eval() if device is not None else model.eval()
