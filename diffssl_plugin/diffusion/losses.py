"""Diffusion training losses: pure functions of (network, clean batch, schedule, random source)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from .schedule import add_noise, sample_timesteps

EpsilonModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def epsilon_loss(
    model: EpsilonModel, x0: torch.Tensor, scheduler: DDPMScheduler, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DDPM's simple loss ``E_{t, ε} ‖ε - ε_θ(x_t, t)‖²`` (Ho et al. 2020, Algorithm 1).

    ``model(x_t, t)`` predicts the noise. Randomness comes from ``generator`` (on CPU) so a training step is a
    deterministic function of its seed, which is what makes resumed runs repeat exactly.
    """
    t = sample_timesteps(x0.shape[0], scheduler.config.num_train_timesteps, generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(device=x0.device, dtype=x0.dtype)
    pred = model(add_noise(scheduler, x0, noise, t), t)
    return F.mse_loss(pred.float(), noise.float())


def reparameterise(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``z = μ + exp(½ log σ²) ε`` with ε drawn from ``generator`` (Kingma & Welling)."""
    eps = torch.randn(mean.shape, generator=generator).to(device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(N(μ, σ²) ‖ N(0, I))`` summed over code dimensions, shape (B,)."""
    return 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).sum(dim=1)
