"""The block structure of a diffusers ``UNet2DModel``, read without running it: readable block names, the units
whose outputs become skip connections, which encoder unit each decoder unit mirrors, every unit's output
shape (from a forward on the ``meta`` device), a truncated view of the U-Net that ends at one block, and the
edit of a unit's output (DifFeed's feedback), and one forward that captures (and edits) several units through
forward hooks, ending after the last one needed.

Names (see :mod:`diffssl_plugin.backbones.ddae`): ``down{i}``, ``mid``, ``up{i}.{j}`` (j-th residual block of
``up_blocks[i]``, before the upsampler), ``up{i}`` (after it); encoder units ``conv_in`` and ``down{i}.{j}``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import torch
from diffusers import UNet2DModel
from torch import nn

from ..errors import InputError


def unet_block_modules(unet: UNet2DModel) -> dict[str, nn.Module]:
    """Readable block names → modules of a diffusers ``UNet2DModel``, in forward order."""
    blocks: dict[str, nn.Module] = {}
    for i, block in enumerate(unet.down_blocks):
        blocks[f"down{i}"] = block
    if unet.mid_block is not None:
        blocks["mid"] = unet.mid_block
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            blocks[f"up{i}.{j}"] = attentions[j] if attentions is not None and attentions[j] is not None else resnet
        blocks[f"up{i}"] = block
    return blocks


def unet_encoder_units(unet: UNet2DModel) -> dict[str, nn.Module]:
    """The modules whose outputs a ``UNet2DModel`` stores as skip connections, in forward order: ``conv_in``,
    ``down{i}.{j}`` (residual block j of ``down_blocks[i]``, after its attention if any) and ``down{i}``."""
    units: dict[str, nn.Module] = {"conv_in": unet.conv_in}
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            attention = attentions[j] if attentions is not None else None
            units[f"down{i}.{j}"] = attention if attention is not None else resnet
        units[f"down{i}"] = block
    return units


def unet_skip_mirrors(unet: UNet2DModel) -> dict[str, str]:
    """Decoder unit → the encoder unit whose skip connection it consumes (its mirror).

    Skips form a stack: ``conv_in``, then per down block its residual blocks and its downsampler; each up
    block pops one per residual block. A down block's last skip is named by the block (``down{i}``), its
    others by their residual blocks (``down{i}.{j}``). ``up{i}`` (after the upsampler) mirrors what
    ``up{i}``'s last residual block mirrors, like ADM's output block that ends with the upsampler.
    """
    stack = ["conv_in"]
    for i, block in enumerate(unet.down_blocks):
        names = [f"down{i}.{j}" for j in range(len(block.resnets))]
        if getattr(block, "downsamplers", None) is not None:
            names.append(f"down{i}")
        elif names:
            names[-1] = f"down{i}"
        stack += names
    mirrors: dict[str, str] = {}
    for i, block in enumerate(unet.up_blocks):
        for j in range(len(block.resnets)):
            if stack:
                mirrors[f"up{i}.{j}"] = stack.pop()
        last = f"up{i}.{len(block.resnets) - 1}"
        if last in mirrors:
            mirrors[f"up{i}"] = mirrors[last]
    return mirrors


def unet_unit_shapes(unet: UNet2DModel) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of every unit's output (:func:`unet_encoder_units` and :func:`unet_block_modules`) for one
    ``sample_size`` image, from a forward of a copy of ``unet`` built on the ``meta`` device: shapes only, no
    weights and no arithmetic, so the 554M-parameter ADM costs what building its modules costs."""
    with torch.device("meta"):
        meta = type(unet).from_config(unet.config)
    shapes: dict[str, tuple[int, int, int]] = {}

    def record(name: str):
        def hook(module, args, output):
            shapes[name] = tuple((output[0] if isinstance(output, tuple) else output).shape[1:])

        return hook

    for name, module in {**unet_encoder_units(meta), **unet_block_modules(meta)}.items():
        module.register_forward_hook(record(name))
    size = int(unet.config.sample_size)
    with torch.no_grad():
        meta(
            torch.zeros(1, unet.config.in_channels, size, size, device="meta"),
            torch.zeros(1, dtype=torch.long, device="meta"),
        )
    return shapes


_BLOCK_NAME = re.compile(r"^(down|up)(\d+)(?:\.(\d+))?$")


def _shallow_copy(module: nn.Module, **children) -> nn.Module:
    """``module`` with the named children replaced; every other child is ``module``'s own (shared weights)."""
    view = copy.copy(module)
    view._modules = {**module._modules, **children}
    return view


def truncated_unet(unet: UNet2DModel, block: str) -> UNet2DModel | None:
    """A view of ``unet`` whose output is block ``block``'s (a name of :func:`unet_block_modules`).

    The blocks after ``block`` are left out and the output layers (norm, activation, conv) are identities; for
    ``up{i}.{j}`` block i keeps its first j + 1 residual blocks (and attentions) and no upsampler, so it takes
    the same skips. Every module left is ``unet``'s own: only the containers are new. Calling the view runs
    diffusers' own forward and stops after ``block`` with no hooks and no exception, which
    ``torch.compile(fullgraph=True)`` can trace. None where diffusers' forward does more after the last block
    than the output layers (Fourier time embedding: the output is divided by σ; skip blocks).
    """
    if unet.config.time_embedding_type == "fourier" or any(
        hasattr(b, "skip_conv") for b in (*unet.down_blocks, *unet.up_blocks)
    ):
        return None
    down, mid, up = list(unet.down_blocks), unet.mid_block, list(unet.up_blocks)
    m = _BLOCK_NAME.match(block)
    if block == "mid":
        up = []
    elif m and m.group(1) == "down":
        down, mid, up = down[: int(m.group(2)) + 1], None, []
    elif m:
        i = int(m.group(2))
        up = up[: i + 1]
        if m.group(3) is not None:
            j = int(m.group(3)) + 1
            cut = {"resnets": nn.ModuleList(up[i].resnets[:j]), "upsamplers": None}
            if getattr(up[i], "attentions", None) is not None:
                cut["attentions"] = nn.ModuleList(up[i].attentions[:j])
            up[i] = _shallow_copy(up[i], **cut)
    else:
        raise InputError(f"no U-Net block is named {block!r}")
    return _shallow_copy(
        unet,
        down_blocks=nn.ModuleList(down),
        mid_block=mid,
        up_blocks=nn.ModuleList(up),
        conv_norm_out=nn.Identity(),
        conv_act=nn.Identity(),
        conv_out=nn.Identity(),
    )


def edited_output(name: str, output, edit: Callable[[torch.Tensor], torch.Tensor]):
    """``output`` with ``edit`` applied; for a down block's ``(hidden, skips)``, to ``hidden`` and
    ``skips[-1]`` (the same tensor)."""
    if isinstance(output, tuple):
        if len(output) != 2 or not output[1] or output[1][-1] is not output[0]:
            raise InputError(f"cannot edit {name!r}: its output is not (hidden, skips) with hidden as the last skip")
        hidden, skips = output
        new = edit(hidden)
        _check_edit(name, hidden, new)
        return new, (*skips[:-1], new)
    new = edit(output)
    _check_edit(name, output, new)
    return new


def _check_edit(name: str, old: torch.Tensor, new) -> None:
    if not isinstance(new, torch.Tensor) or new.shape != old.shape:
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise InputError(f"the edit of {name!r} must return a tensor of shape {tuple(old.shape)}, got {got}")


class _StopForward(Exception):
    """Raised by the capture hook of the last unit needed, to end the U-Net forward early."""


def capture_units(
    unet: UNet2DModel,
    units: dict[str, nn.Module],
    order: dict[str, int],
    x_t: torch.Tensor,
    t: torch.Tensor,
    wanted: set[str],
    edits: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """One forward of ``unet`` on ``(x_t, t)`` with forward hooks on ``units`` (name → module, forward ``order``):
    the outputs of the ``wanted`` units, the ``edits`` applied to unit outputs on the way (a unit both edited
    and wanted is returned edited), and the forward ended by the last wanted unit's hook (edits of later units
    never run)."""
    feats: dict[str, torch.Tensor] = {}
    edits = dict(edits or {})
    last = max(wanted, key=order.__getitem__)

    def hook_for(name: str):
        def hook(module, args, output):
            if name in edits:
                output = edited_output(name, output, edits[name])
            if name in wanted:
                feats[name] = output[0] if isinstance(output, tuple) else output
            if name == last:
                raise _StopForward
            return output if name in edits else None

        return hook

    hooked = wanted | {n for n in edits if order[n] < order[last]}
    handles = [units[n].register_forward_hook(hook_for(n)) for n in hooked]
    try:
        unet(x_t, t)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return feats
