"""Backbones: networks that honour timm's contract, plus ``extract`` for diffusion features."""

from . import (  # each model file registers its timm names at its bottom
    baselines,  # noqa: F401
    drl,  # noqa: F401
    ebm,  # noqa: F401
)
from .ddae import DDAEBackbone
from .pooling import pool_features, pooled_dim
from .raw import RawPixels
from .unet_blocks import unet_block_modules
from .unet_presets import UNET_PRESETS

__all__ = ["UNET_PRESETS", "DDAEBackbone", "RawPixels", "pool_features", "pooled_dim", "unet_block_modules"]
