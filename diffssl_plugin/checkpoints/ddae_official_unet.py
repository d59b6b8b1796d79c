"""The diffusers U-Net subclass that DDAE's own DDPM checkpoints load into (:mod:`.ddae_official`).

Two of DDAE's differences from the DDPM U-Net cannot be set through ``UNet2DModel``'s config: the output
GroupNorm has 8 groups (diffusers uses ``norm_num_groups`` for it) and the time input is ``t_DDAE / n_T`` with
``t_DDAE = t + 1`` for our 0-indexed ``t`` (diffusers' sinusoid takes the integer timestep). The subclass swaps
those two modules after ``UNet2DModel.__init__``; its forward *is* diffusers' (no copy), so the block views and
hooks of :class:`~diffssl_plugin.backbones.DDAEBackbone` work unchanged.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import Timesteps
from torch import nn


class DDAETimeInput(Timesteps):
    """diffusers' sinusoid of ``(t + offset) / scale``: DDAE's DDPM feeds ``t_DDAE / n_T`` with ``t_DDAE = t + 1``."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, freq_shift: float, offset: float, scale: float):
        super().__init__(num_channels, flip_sin_to_cos, freq_shift)
        self.offset, self.time_scale = float(offset), float(scale)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return super().forward((timesteps.float() + self.offset) / self.time_scale)


def _ddae_init(
    self, norm_out_groups: int = 8, time_offset: float = 1.0, time_scale: float = 1000.0, **unet_kwargs
) -> None:
    UNet2DModel.__init__(self, **unet_kwargs)
    cfg = self.config
    channels = cfg.block_out_channels[0]
    self.conv_norm_out = nn.GroupNorm(norm_out_groups, channels, eps=cfg.norm_eps)
    self.time_proj = DDAETimeInput(channels, cfg.flip_sin_to_cos, cfg.freq_shift, time_offset, time_scale)


# diffusers reads a model's config keys from its __init__ signature (register_to_config, from_config): give the
# subclass UNet2DModel's parameters plus its own, so save_config/from_config (and the meta-device copy that
# DDAEBackbone builds for its block shapes) round-trip.
_ddae_init.__signature__ = inspect.signature(UNet2DModel.__init__).replace(
    parameters=[
        *(p for p in inspect.signature(UNet2DModel.__init__).parameters.values() if p.kind != p.VAR_KEYWORD),
        *(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=d)
            for name, d in (("norm_out_groups", 8), ("time_offset", 1.0), ("time_scale", 1000.0))
        ),
    ]
)


class DDAEUNet2DModel(UNet2DModel):
    """``UNet2DModel`` with DDAE's two differences that its config cannot express: a ``norm_out_groups``-group
    output GroupNorm and the time input ``(t + time_offset) / time_scale`` (see the module docstring).

    Its config names this class (``_class_name``) and holds the three extra keys, so a plain ``UNet2DModel``
    refuses it rather than silently building the other architecture."""

    __init__ = register_to_config(_ddae_init)
