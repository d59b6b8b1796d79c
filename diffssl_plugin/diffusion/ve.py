"""The variance-exploding (VE) SDE of score_sde, its noise-level samplers, and denoising score matching with
the likelihood weighting λ(σ) = σ² (DRL, Mittal/Abstreiter et al.; Song et al. 2021).

**Schedule.** ``σ(t) = σ_min (σ_max/σ_min)^t`` for ``t ∈ [0, 1]`` (score_sde's VE schedule; DRL uses
σ_min = 0.01, σ_max = 50). The perturbed sample is ``x_t = x_0 + σ(t) ε`` with ``ε ~ N(0, I)``, as in
score_sde's code (the kernel's exact std ``sqrt(σ²(t) − σ²(0))`` differs from σ(t) by < 1e-4 relative at
t > 0.1 and the DRL issue fixes ``x_t = x_0 + σ ε``).

**Samplers** (which noise levels training sees; DRL §"level of detail"):

* ``"uniform_t"`` (default): ``t ~ U[0, 1]``, i.e. σ log-uniform on [σ_min, σ_max]; weights small noise.
* ``"uniform_sigma"``: ``σ ~ U[σ_min, σ_max]``; weights large noise (almost every draw has σ > 1).

Either can be restricted to an explicit range ``sigma_range=(lo, hi)`` inside [σ_min, σ_max].

**Loss.** ``λ(σ) ‖s_θ(x_t, σ) − ∇ log p(x_t | x_0)‖²`` with ``λ = σ²`` and ``∇ log p = −ε/σ`` is
``‖σ s_θ(x_t, σ) + ε‖²``. It is averaged over pixels (score_sde's ``reduce_mean=True``; the sum over pixels
is this times the number of pixels) and over the batch.

Everything here is a pure function of its inputs and a ``torch.Generator`` (k-diffusion style: networks know
nothing of schedules).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InputError, check_name

VE_DEFAULTS = {"sigma_min": 0.01, "sigma_max": 50.0}
NOISE_SAMPLERS = ("uniform_t", "uniform_sigma")

#: ``score_fn(x_t, sigma, t) -> score``: σ and t are (B,) tensors; the score has the shape of ``x_t``.
ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class VESchedule:
    """``σ(t) = σ_min (σ_max/σ_min)^t`` on ``t ∈ [0, 1]``. σ_min must be positive and below σ_max."""

    sigma_min: float = VE_DEFAULTS["sigma_min"]
    sigma_max: float = VE_DEFAULTS["sigma_max"]

    def __post_init__(self):
        lo, hi = float(self.sigma_min), float(self.sigma_max)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise InputError(f"VE schedule needs finite σ_min and σ_max, got {lo} and {hi}")
        if lo <= 0:
            raise InputError(f"VE schedule needs σ_min > 0 (σ(t) is geometric), got σ_min = {lo:g}")
        if lo >= hi:
            raise InputError(f"VE schedule needs σ_min < σ_max, got σ_min = {lo:g} ≥ σ_max = {hi:g}")

    @property
    def log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """σ(t) for ``t ∈ [0, 1]``."""
        t = torch.as_tensor(t, dtype=torch.float32)
        return self.sigma_min * torch.exp(t * self.log_ratio)

    def t_of_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The inverse: ``t = log(σ/σ_min) / log(σ_max/σ_min)``."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        return torch.log(sigma / self.sigma_min) / self.log_ratio


@dataclass(frozen=True)
class NoiseSampler:
    """Draws per-sample noise levels ``(t, σ)`` for training; see the module docstring for the names.

    ``sigma_range=(lo, hi)`` restricts σ to ``[lo, hi] ⊆ [σ_min, σ_max]`` (log-uniform for ``"uniform_t"``,
    uniform for ``"uniform_sigma"``); ``None`` means the whole schedule.
    """

    name: str = "uniform_t"
    schedule: VESchedule = VESchedule()
    sigma_range: tuple[float, float] | None = None

    def __post_init__(self):
        check_name("noise sampler", self.name, NOISE_SAMPLERS)
        if self.sigma_range is not None:
            lo, hi = (float(s) for s in self.sigma_range)
            s = self.schedule
            if not lo < hi:
                raise InputError(f"sigma_range needs lo < hi, got ({lo:g}, {hi:g})")
            if lo < s.sigma_min * (1 - 1e-6) or hi > s.sigma_max * (1 + 1e-6):
                raise InputError(
                    f"sigma_range ({lo:g}, {hi:g}) must lie inside the schedule's "
                    f"[σ_min, σ_max] = [{s.sigma_min:g}, {s.sigma_max:g}]"
                )
            object.__setattr__(self, "sigma_range", (lo, hi))

    @property
    def bounds(self) -> tuple[float, float]:
        """The σ interval the sampler draws from."""
        return self.sigma_range or (self.schedule.sigma_min, self.schedule.sigma_max)

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, σ)``, two float32 (B,) tensors with ``σ = σ(t)``."""
        u = torch.rand(batch_size, generator=generator)
        lo, hi = self.bounds
        if self.name == "uniform_t":
            t_lo, t_hi = (float(self.schedule.t_of_sigma(s)) for s in (lo, hi))
            t = t_lo + (t_hi - t_lo) * u
            sigma = self.schedule.sigma(t)
        else:
            sigma = lo + (hi - lo) * u
            t = self.schedule.t_of_sigma(sigma)
        return t.clamp(0.0, 1.0).to(device), sigma.to(device)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "sigma_min": self.schedule.sigma_min,
            "sigma_max": self.schedule.sigma_max,
            "sigma_range": list(self.sigma_range) if self.sigma_range else None,
        }


def noise_sampler(
    name: str = "uniform_t",
    sigma_min: float = VE_DEFAULTS["sigma_min"],
    sigma_max: float = VE_DEFAULTS["sigma_max"],
    sigma_range: tuple[float, float] | None = None,
) -> NoiseSampler:
    """A :class:`NoiseSampler` from plain arguments (unknown names raise ``UnknownNameError``)."""
    return NoiseSampler(name, VESchedule(sigma_min, sigma_max), tuple(sigma_range) if sigma_range else None)


def ve_perturb(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x_t = x_0 + σ ε`` with a per-sample σ of shape (B,)."""
    return x0 + sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype) * noise


def ve_dsm_loss(
    score_fn: ScoreFn,
    x0: torch.Tensor,
    sampler: NoiseSampler,
    generator: torch.Generator | None = None,
    per_sample: bool = False,
) -> torch.Tensor:
    """Denoising score matching with λ = σ²: ``mean_pixels ‖σ s_θ(x_t, σ, t) + ε‖²``.

    Draws ``(t, σ)`` from ``sampler`` and then ``ε`` from ``generator`` (in that order), calls
    ``score_fn(x_t, σ, t)`` and returns the batch mean, or the (B,) per-sample losses with ``per_sample``.
    """
    t, sigma = sampler.sample(x0.shape[0], generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(device=x0.device, dtype=x0.dtype)
    score = score_fn(ve_perturb(x0, sigma, noise), sigma, t)
    if score.shape != x0.shape:
        raise InputError(f"score_fn returned shape {tuple(score.shape)}, expected {tuple(x0.shape)}")
    residual = sigma.view(-1, *([1] * (x0.dim() - 1))) * score.float() + noise.float()
    losses = residual.pow(2).flatten(1).mean(1)
    return losses if per_sample else losses.mean()


@torch.no_grad()
def ve_reverse_sde_sample(
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    steps: int = 500,
    schedule: VESchedule = VESchedule(),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    shared_noise: bool = False,
) -> torch.Tensor:
    """Samples from the VE reverse SDE (score_sde's reverse-diffusion predictor, no corrector).

    Start at ``x ~ N(0, σ_max² I)``, walk the geometric σ grid ``σ_0 = σ_max > … >
    σ_{N-1} = σ_min`` with ``x ← x + (σ_i² − σ_{i+1}²) s(x, σ_i) + sqrt(σ_i² − σ_{i+1}²) ξ``, then take the
    noise-free Tweedie step ``x ← x + σ_min² s(x, σ_min)`` (score_sde's ``noise_removal``). ``score_fn`` is called
    as ``score_fn(x, σ, t)`` with (B,) σ and t; pass a closure to condition it (e.g. on a DRL code). Fresh noise
    ``ξ`` comes from ``generator`` (drawn on the CPU), so a run repeats exactly from its seed. With
    ``shared_noise`` every image of the batch gets the same start and the same ``ξ`` (a grid over a condition
    then differs by the condition only).
    """
    if steps < 2:
        raise InputError(f"the reverse SDE needs at least 2 steps, got {steps}")
    t_grid = torch.linspace(1.0, 0.0, steps)
    sigmas = schedule.sigma(t_grid)
    noise_shape = (1, *shape[1:]) if shared_noise else tuple(shape)

    def draw() -> torch.Tensor:
        return torch.randn(noise_shape, generator=generator).expand(shape).to(device)

    x = draw() * schedule.sigma_max
    ones = torch.ones(shape[0], device=device)
    for i in range(steps - 1):
        step_var = float(sigmas[i] ** 2 - sigmas[i + 1] ** 2)
        x = x + step_var * score_fn(x, ones * sigmas[i], ones * t_grid[i]).float()
        x = x + math.sqrt(step_var) * draw()
    return x + float(sigmas[-1] ** 2) * score_fn(x, ones * sigmas[-1], ones * t_grid[-1]).float()
