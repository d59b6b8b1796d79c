"""DRL encoders ``E_φ(x_0)`` and ``E_φ(x_0, t)`` (see :mod:`diffssl_plugin.backbones.drl` for the design notes):
small diffusers-block networks from a clean image in [-1, 1] to a code, optionally time-dependent (FiLM) and
variational (mean and log-variance)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import InputError, check_name

#: integer harness timestep k ↔ DRL time t = k / TIMESTEP_SCALE
TIMESTEP_SCALE = 1000

ENCODER_PRESETS: dict[str, dict] = {
    # 28×28 grey images: 28 → 14 → 7 → 3, then global pool; 0.07 GFLOP per image per training step (forward
    # and backward), 6% of the score U-Net below (a (32, 64, 128) encoder would cost 0.22 GFLOP, mostly at 28×28).
    "fmnist": {"in_chans": 1, "image_size": 28, "channels": (16, 32, 64, 128), "norm_num_groups": 8},
    # 32×32 colour images (CIFAR-sized): one more level.
    "cifar10": {"in_chans": 3, "image_size": 32, "channels": (64, 128, 256, 256), "norm_num_groups": 32},
}


def preset_config(kind: str, config: dict | str, presets: dict[str, dict]) -> dict:
    """A copy of preset ``config`` from ``presets`` (unknown names list the valid ones), or of the dict given."""
    if isinstance(config, str):
        return dict(presets[check_name(kind, config, presets)])
    return dict(config)


def check_code_dim(code_dim) -> int:
    if isinstance(code_dim, bool) or not isinstance(code_dim, int) or code_dim <= 0:
        raise InputError(f"code size must be a positive integer, got {code_dim!r}")
    return code_dim


class DRLEncoder(nn.Module):
    """``E_φ(x_0)`` or ``E_φ(x_0, t)``; ``forward`` returns ``(mean, logvar)`` (``logvar`` is None unless
    ``variational``). See the module docstring for the architecture."""

    #: recompute each residual block's activations in the backward (DRLBackbone.set_grad_checkpointing)
    grad_checkpointing = False

    def __init__(
        self,
        in_chans: int = 1,
        image_size: int = 28,
        channels: Sequence[int] = (16, 32, 64, 128),
        code_dim: int = 64,
        time_dependent: bool = False,
        variational: bool = False,
        norm_num_groups: int = 8,
    ):
        super().__init__()
        self.code_dim = check_code_dim(code_dim)
        channels = tuple(int(c) for c in channels)
        if not channels or any(c <= 0 or c % norm_num_groups for c in channels):
            raise InputError(
                f"encoder channels {channels} must be positive multiples of norm_num_groups ({norm_num_groups})"
            )
        self.in_chans, self.image_size, self.channels = int(in_chans), int(image_size), channels
        self.time_dependent, self.variational = bool(time_dependent), bool(variational)
        temb = 4 * channels[0] if time_dependent else None
        if time_dependent:
            self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
            self.time_embedding = TimestepEmbedding(channels[0], temb)
        self.conv_in = nn.Conv2d(in_chans, channels[0], 3, padding=1)
        blocks, prev = [], channels[0]
        for i, c in enumerate(channels):
            blocks.append(
                ResnetBlock2D(
                    in_channels=prev,
                    out_channels=c,
                    temb_channels=temb,
                    groups=norm_num_groups,
                    down=i > 0,
                    time_embedding_norm="scale_shift" if temb else "default",
                )
            )
            prev = c
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(norm_num_groups, prev)
        self.act = nn.SiLU()
        self.head = nn.Linear(prev, code_dim * (2 if variational else 1))

    @property
    def reductions(self) -> list[int]:
        return [2**i for i in range(len(self.channels))]

    def _temb(self, x: torch.Tensor, t: torch.Tensor | float | None) -> torch.Tensor | None:
        if not self.time_dependent:
            return None
        if t is None:
            raise InputError("a time-dependent encoder E(x0, t) needs the time t ∈ [0, 1]")
        if isinstance(t, torch.Tensor):
            t = t.to(device=x.device, dtype=torch.float32)
            t = t.expand(x.shape[0]) if t.dim() == 0 else t
        else:  # a fill on the device, not a copy from the host
            t = torch.full((x.shape[0],), float(t), device=x.device)
        if t.shape != (x.shape[0],):
            raise InputError(
                f"t must be a scalar or have one value per image ({x.shape[0]}), got shape {tuple(t.shape)}"
            )
        return self.time_embedding(self.time_proj(t * TIMESTEP_SCALE).to(x.dtype))

    def stages(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> list[torch.Tensor]:
        """The NCHW output of every residual block (resolution halves after the first)."""
        temb = self._temb(x, t)
        h, out = self.conv_in(x), []
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, temb, use_reentrant=False)
            else:
                h = block(h, temb)
            out.append(h)
        return out

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.stages(x, t)[-1]
        h = self.head(self.act(self.norm_out(h)).mean(dim=(2, 3)))
        if self.variational:
            mean, logvar = h.chunk(2, dim=1)
            return mean, logvar.clamp(-30.0, 20.0)
        return h, None


def build_encoder(
    encoder_config: dict | str = "fmnist",
    code_dim: int = 64,
    time_dependent: bool = False,
    variational: bool = False,
    in_chans: int | None = None,
    image_size: int | None = None,
) -> tuple[DRLEncoder, dict]:
    """An encoder from a preset name or config dict (plus overrides); returns it and its full config."""
    config = preset_config("encoder preset", encoder_config, ENCODER_PRESETS)
    if in_chans is not None:
        config["in_chans"] = int(in_chans)
    if image_size is not None:
        config["image_size"] = int(image_size)
    config["channels"] = list(config.get("channels", (16, 32, 64, 128)))
    return DRLEncoder(code_dim=code_dim, time_dependent=time_dependent, variational=variational, **config), config
