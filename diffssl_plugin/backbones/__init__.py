"""Backbones: networks that honour timm's contract, plus ``extract`` for diffusion features."""

from . import (
    baselines,  # noqa: F401
    drl,  # noqa: F401
    ebm,  # noqa: F401
    timm_models,  # noqa: F401  (registers the timm model names)
)
from .ddae import UNET_PRESETS, DDAEBackbone
from .pooling import pool_features, pooled_dim
from .raw import RawPixels
from .unet_blocks import unet_block_modules

__all__ = ["UNET_PRESETS", "DDAEBackbone", "RawPixels", "pool_features", "pooled_dim", "unet_block_modules"]
