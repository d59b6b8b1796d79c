"""Diffusion core: noise schedules, losses, EMA and samplers, shared by every diffusion learner."""

from .ema import EMA, ema_decay
from .energy import (SIGMA0, SIGMA_GRIDS, annealed_langevin, denoise, energy_grad, inpaint, mdsm_loss, sample,
                     sigma_grid, temperature_schedule)
from .losses import epsilon_loss
from .schedule import DDPM_DEFAULTS, add_noise, check_timesteps, ddpm_scheduler, sample_timesteps
from .ve import NOISE_SAMPLERS, NoiseSampler, VESchedule, noise_sampler, ve_dsm_loss, ve_perturb

__all__ = ["EMA", "ema_decay", "epsilon_loss", "DDPM_DEFAULTS", "add_noise", "check_timesteps",
           "ddpm_scheduler", "sample_timesteps", "NOISE_SAMPLERS", "NoiseSampler",
           "VESchedule", "noise_sampler", "ve_dsm_loss", "ve_perturb",
           "SIGMA0", "SIGMA_GRIDS", "annealed_langevin", "denoise", "energy_grad", "inpaint", "mdsm_loss", "sample",
           "sigma_grid", "temperature_schedule"]
