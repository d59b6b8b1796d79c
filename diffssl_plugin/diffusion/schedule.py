"""DDPM noise schedule and timestep convention, shared by every diffusion learner and backbone.

**Timestep convention.** All timesteps in this package are 0-indexed diffusers timesteps ``t ∈ {0, …, T-1}``
(T = 1000 by default, linear β from 1e-4 to 0.02), with ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`` and
``ᾱ_t = ∏_{s≤t} (1 - β_s)``. DDAE's code counts from 1 (``t ∈ [1, T]``), so DDAE's ``t = 11`` is our ``10``;
guided-diffusion (DDPM-seg, diffssl) is 0-indexed like us.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers import DDPMScheduler

from ..errors import InputError

DDPM_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


def ddpm_scheduler(**overrides) -> DDPMScheduler:
    """diffusers' ``DDPMScheduler`` with the DDPM paper's linear schedule (ε-prediction, clipped x̂_0)."""
    return DDPMScheduler(**{**DDPM_DEFAULTS, "prediction_type": "epsilon", "clip_sample": True, **overrides})


def check_timesteps(timesteps: Iterable[int], num_train_timesteps: int) -> list[int]:
    """Validate 0-indexed timesteps; an out-of-range one raises an error that states the valid range."""
    out = []
    for t in timesteps:
        try:
            is_integer = not isinstance(t, (bool, str)) and float(t).is_integer()
        except (TypeError, ValueError):
            is_integer = False
        if not is_integer:
            raise InputError(
                f"timestep {t!r} is not an integer; valid timesteps are integers "
                f"0..{num_train_timesteps - 1} (0-indexed diffusers timesteps)"
            )
        if not 0 <= int(t) < num_train_timesteps:
            raise InputError(
                f"timestep {t} out of range: valid timesteps are 0..{num_train_timesteps - 1} "
                "(0-indexed; DDAE's t=11 is our 10)"
            )
        out.append(int(t))
    return out


def add_noise(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε`` for a batch of per-sample integer timesteps."""
    alphas = scheduler.alphas_cumprod.to(device=x0.device, dtype=torch.float32)[timesteps]
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = alphas.sqrt().view(shape)
    s = (1 - alphas).sqrt().view(shape)
    return (a * x0.float() + s * noise.float()).to(x0.dtype)


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniform training timesteps ``t ~ U{0, …, T-1}`` (DDPM's Algorithm 1)."""
    t = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    return t.to(device)
