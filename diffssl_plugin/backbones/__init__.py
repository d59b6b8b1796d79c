"""Backbones: networks that honour timm's contract, plus ``extract`` for diffusion features."""

from . import timm_models  # noqa: F401  (registers the timm model names)
from . import drl  # noqa: F401
from . import ebm  # noqa: F401
from . import baselines  # noqa: F401
from .ddae import UNET_PRESETS, DDAEBackbone
from .pooling import pool_features, pooled_dim
from .raw import RawPixels
from .unet_blocks import unet_block_modules

__all__ = ["UNET_PRESETS", "DDAEBackbone", "unet_block_modules", "pool_features", "pooled_dim", "RawPixels"]
