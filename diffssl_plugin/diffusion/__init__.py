"""Diffusion core: noise schedules, losses, EMA and samplers, shared by every diffusion learner."""

from .ema import EMA, ema_decay
from .losses import epsilon_loss
from .schedule import DDPM_DEFAULTS, add_noise, check_timesteps, ddpm_scheduler, sample_timesteps

__all__ = ["EMA", "ema_decay", "epsilon_loss", "DDPM_DEFAULTS", "add_noise", "check_timesteps",
           "ddpm_scheduler", "sample_timesteps"]
