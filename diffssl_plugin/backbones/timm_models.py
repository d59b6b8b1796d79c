"""timm registration: after ``import diffssl_plugin``, ``timm.create_model(name, ...)`` builds our backbones.

``default_cfgs`` must stand above the ``@register_model`` functions (timm reads it at decoration time).
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .ddae import UNET_PRESETS, DDAEBackbone
from .raw import RawPixels
from .timm_contract import default_data_cfg


def _cfg(in_chans: int, size: int, **kw) -> dict:
    return {**default_data_cfg(in_chans, size), **kw}


default_cfgs = generate_default_cfgs(
    {
        "ddae_unet_fmnist.untrained": _cfg(
            1, 28, paper_ids="arXiv:2303.09769", description="DDAE small CPU U-Net for 28×28 grey images"
        ),
        "ddae_unet_cifar10.untrained": _cfg(
            3, 32, paper_ids="arXiv:2303.09769", description="DDAE / DDPM 35.7M CIFAR-10 U-Net (google/ddpm-cifar10-32)"
        ),
        "raw_pixels.fmnist": {**_cfg(1, 28), "mean": (0.0,), "std": (1.0,), "first_conv": ""},
    }
)


def _create(cls, variant: str, pretrained: bool, num_feature_levels: int = 1, **kwargs):
    """timm's builder with the getter feature wrapper (a U-Net cannot be re-run child by child)."""
    feature_cfg = {"feature_cls": "getter", "out_indices": tuple(range(num_feature_levels))}
    return build_model_with_cfg(cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


def _unet_levels(preset: str) -> int:
    """feature_info of a DDAE U-Net has one entry per up block plus the middle block."""
    return len(UNET_PRESETS[preset]["up_block_types"]) + 1


@register_model
def ddae_unet_fmnist(pretrained: bool = False, **kwargs) -> DDAEBackbone:
    """Small DDAE U-Net for Fashion-MNIST; default readout chosen by the bench sweep (mid block, 2×2 pool)."""
    args = {"unet_config": "fmnist_small", "timestep": 10, "block": "mid", "pool": "avg2x2"}
    return _create(DDAEBackbone, "ddae_unet_fmnist", pretrained, _unet_levels("fmnist_small"), **{**args, **kwargs})


@register_model
def ddae_unet_cifar10(pretrained: bool = False, **kwargs) -> DDAEBackbone:
    """DDAE's DDPM CIFAR-10 U-Net read at DDAE's choice: ``out_6`` (our ``up1.2``) at DDAE t=11 (our 10), GAP."""
    args = {"unet_config": "cifar10_ddpm", "timestep": 10, "block": "up1.2", "pool": "avg"}
    return _create(DDAEBackbone, "ddae_unet_cifar10", pretrained, _unet_levels("cifar10_ddpm"), **{**args, **kwargs})


@register_model
def raw_pixels(pretrained: bool = False, **kwargs) -> RawPixels:
    """Flattened pixels: the floor row of every leaderboard."""
    model = _create(RawPixels, "raw_pixels", pretrained, **kwargs)
    # timm's builder sets the registered 1×28×28 cfg; keep the channels and size this model was built with
    model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **model.data_cfg()}
    return model
