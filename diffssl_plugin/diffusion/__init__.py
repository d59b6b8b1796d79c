"""Diffusion core: noise schedules, losses, EMA and samplers, shared by every diffusion learner."""

from .ema import EMA, ema_decay
from .energy import (
    SIGMA0,
    SIGMA_GRIDS,
    annealed_langevin,
    denoise,
    energy_grad,
    inpaint,
    mdsm_loss,
    sample,
    sigma_grid,
    temperature_schedule,
)
from .losses import epsilon_loss
from .schedule import DDPM_DEFAULTS, add_noise, check_timesteps, ddpm_scheduler, sample_timesteps
from .ve import NOISE_SAMPLERS, NoiseSampler, VESchedule, noise_sampler, ve_dsm_loss, ve_perturb

__all__ = [
    "DDPM_DEFAULTS",
    "EMA",
    "NOISE_SAMPLERS",
    "SIGMA0",
    "SIGMA_GRIDS",
    "NoiseSampler",
    "VESchedule",
    "add_noise",
    "annealed_langevin",
    "check_timesteps",
    "ddpm_scheduler",
    "denoise",
    "ema_decay",
    "energy_grad",
    "epsilon_loss",
    "inpaint",
    "mdsm_loss",
    "noise_sampler",
    "sample",
    "sample_timesteps",
    "sigma_grid",
    "temperature_schedule",
    "ve_dsm_loss",
    "ve_perturb",
]
