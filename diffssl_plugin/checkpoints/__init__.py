"""Official checkpoints of the papers, loaded as this package's backbones.

``load_backbone_checkpoint(kind, path, **kwargs)`` is the one entry point:

================  ==================================================  ===========================================
kind              path                                                returns
================  ==================================================  ===========================================
``diffusers_ddpm``  a diffusers DDPM folder (``google/ddpm-cifar10-32``  ``DDAEBackbone`` (default: DDAE's ``out_6``
                  layout: ``unet/``, ``scheduler/``)                   = ``up1.2`` at DDAE t=11 = our 10)
``adm``           guided-diffusion ``.pt``/``.safetensors`` (the       ``DDAEBackbone`` over the converted
                  256×256 unconditional ADM), or a folder written by   ``UNet2DModel`` (default: diffssl block 24
                  :func:`save_adm_as_diffusers`                        = ``up1.1`` at t=150, 2×2 average pool)
``mdsm``          MDSM's ``netE_*.pt`` (DataParallel ``module.``       ``EnergyResNet`` (size read from the weights)
                  keys) or any file with the same weights
``ddae_ddpm``     DDAE's own ``train.py`` checkpoint (``{'MODEL',      ``DDAEBackbone`` over a ``DDAEUNet2DModel``
                  'EMA', 'opt'}``) of a DDPM-architecture U-Net;       (EMA weights; default ``out_6`` = ``up1.2``
                  DDPM++/EDM networks are out of scope                 at DDAE t=11 = our 10)
================  ==================================================  ===========================================

Files are read only as safetensors or with ``torch.load(weights_only=True)``: a pickle that needs code to load
(a custom class, a whole ``torch.save(module)``) is refused with a :class:`~diffssl_plugin.errors.CheckpointError`
that says so, and a truncated or corrupted file gives one that names it. Weights load with ``strict=True``:
a missing, extra or mis-shaped tensor is an error, never a silently random layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from torch import nn

from ..errors import check_name
from .adm import (
    ADM_PRESETS,
    ADMConfig,
    adm_config,
    adm_to_unet,
    adm_unet_config,
    convert_adm_state_dict,
    load_adm,
    load_adm_unet,
    save_adm_as_diffusers,
)
from .ddae_official import (
    DDAEConfig,
    DDAEUNet2DModel,
    convert_ddae_state_dict,
    ddae_to_unet,
    ddae_unet_config,
    infer_ddae_config,
    load_ddae_ddpm,
    load_ddae_unet,
    read_ddae_state_dict,
)
from .diffssl_blocks import diffssl_block_name, diffssl_block_number
from .diffusers_ddpm import (
    DDAE_CIFAR10_BLOCK,
    DDAE_CIFAR10_T,
    ddae_block_name,
    ddae_out_name,
    ddae_timestep,
    load_diffusers_ddpm,
)
from .mdsm import convert_mdsm_state_dict, infer_mdsm_args, load_mdsm

CHECKPOINT_KINDS: dict[str, Callable[..., nn.Module]] = {
    "diffusers_ddpm": load_diffusers_ddpm,
    "adm": load_adm,
    "mdsm": load_mdsm,
    "ddae_ddpm": load_ddae_ddpm,
}


def load_backbone_checkpoint(kind: str, path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load an official checkpoint of ``kind`` (see the module docstring) as a backbone in eval mode.

    ``kwargs`` go to the kind's loader: :func:`load_diffusers_ddpm` (``block``, ``timestep``, ``pool``, …),
    :func:`load_adm` (``block`` as a diffssl number or our name, ``timestep``, ``preset``, …) or
    :func:`load_mdsm` (``img_size``, ``global_pool``, …) or :func:`load_ddae_ddpm` (``block``, ``timestep``,
    ``weights``, ``image_size``, …). An unknown ``kind`` raises
    :class:`~diffssl_plugin.errors.UnknownNameError` listing the kinds.
    """
    return CHECKPOINT_KINDS[check_name("checkpoint kind", kind, CHECKPOINT_KINDS)](path, **kwargs)


__all__ = [
    "ADM_PRESETS",
    "CHECKPOINT_KINDS",
    "DDAE_CIFAR10_BLOCK",
    "DDAE_CIFAR10_T",
    "ADMConfig",
    "DDAEConfig",
    "DDAEUNet2DModel",
    "adm_config",
    "adm_to_unet",
    "adm_unet_config",
    "convert_adm_state_dict",
    "convert_ddae_state_dict",
    "convert_mdsm_state_dict",
    "ddae_block_name",
    "ddae_out_name",
    "ddae_timestep",
    "ddae_to_unet",
    "ddae_unet_config",
    "diffssl_block_name",
    "diffssl_block_number",
    "infer_ddae_config",
    "infer_mdsm_args",
    "load_adm",
    "load_adm_unet",
    "load_backbone_checkpoint",
    "load_ddae_ddpm",
    "load_ddae_unet",
    "load_diffusers_ddpm",
    "load_mdsm",
    "read_ddae_state_dict",
    "save_adm_as_diffusers",
]
