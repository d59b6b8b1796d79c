"""Energy-based diffusion: MDSM's multi-scale denoising score matching loss, annealed Langevin sampling,
inpainting and one-step denoising (Li, Chen & Sommer, arXiv 1910.07762; ``papers.md`` §4).

Everything is a pure function of an energy function ``energy_fn(x) -> (B,)``, tensors and a ``torch.Generator``:
all the randomness comes from the generator (drawn on the CPU, then moved to ``x``'s device), so a training step
or a sampling run repeats exactly from its seed. Data live in [0, 1], as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import InputError, check_name
from .ve import ve_perturb

EnergyFn = Callable[[torch.Tensor], torch.Tensor]

#: the fixed reference noise σ0: ``-σ0² ∇E(x̃)`` is trained to be the denoising step ``x - x̃`` at every σ
SIGMA0 = 0.1

#: the per-batch σ grids of the official training runs: (low, high, spacing)
SIGMA_GRIDS: dict[str, tuple[float, float, str]] = {
    "fmnist": (0.1, 3.0, "log"),  # Fashion-MNIST / MNIST: np.logspace(log10 0.1, log10 3, B)
    "cifar10": (0.05, 1.2, "lin"),  # CIFAR-10: np.linspace(0.05, 1.2, B)
}

#: annealed-Langevin temperature schedules of the official sample.py, as (hold, anneal, cool) step counts
TEMPERATURE_SCHEDULES = ("exp", "lin")
PAPER_SCHEDULE_STEPS = (500, 2000, 200)


# ---------------------------------------------------------------------- noise
def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (half-precision images are computed in float32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gaussian_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn on the CPU from ``generator`` (device-independent)."""
    return torch.randn(like.shape, generator=generator).to(device=like.device, dtype=_work_dtype(like))


def sigma_grid(batch_size: int, low: float, high: float, spacing: str = "log") -> torch.Tensor:
    """MDSM's deterministic per-sample noise levels: ``batch_size`` values from ``low`` to ``high``, log- or
    linearly spaced. Sample ``i`` of every batch gets ``σ_i``; the shuffled data supply the randomness."""
    check_name("σ spacing", spacing, ("log", "lin"))
    if batch_size < 1 or not 0 < low <= high:
        raise InputError(f"σ grid needs batch_size ≥ 1 and 0 < low ≤ high, got {batch_size}, {low}, {high}")
    if spacing == "log":
        return torch.logspace(math.log10(low), math.log10(high), batch_size, dtype=torch.float64).float()
    return torch.linspace(low, high, batch_size, dtype=torch.float64).float()


def perturb(x: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x̃ = x + σ ε`` with one σ per sample (the diffusion core's variance-exploding perturbation)."""
    dtype = _work_dtype(x)
    return ve_perturb(x.to(dtype), sigmas.to(x.device, dtype), gaussian_noise(x, generator))


# ---------------------------------------------------------------------- energy gradient and loss
def energy_grad(energy_fn: EnergyFn, x: torch.Tensor, create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E(x), ∇_x E(x))`` by autograd. With ``create_graph=True`` the gradient stays differentiable with respect
    to the network's weights (the double back-propagation the loss needs); otherwise both come back detached."""
    with torch.enable_grad():
        x = x.detach().to(_work_dtype(x)).requires_grad_(True)
        energy = energy_fn(x)
        if energy.dim() != 1 or energy.shape[0] != x.shape[0]:
            raise InputError(
                f"energy_fn must return one energy per image, shape ({x.shape[0]},), got {tuple(energy.shape)}"
            )
        (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=create_graph)
    if not create_graph:
        energy, grad = energy.detach(), grad.detach()
    return energy, grad


def mdsm_loss(
    energy_fn: EnergyFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generator: torch.Generator | None = None,
    sigma0: float = SIGMA0,
) -> torch.Tensor:
    """MDSM's loss (official ``train.py``):

        L = (1/B) Σ_i ‖x_i − x̃_i + σ0² ∇E(x̃_i)‖² / (σ_i² σ0⁴),   x̃_i = x_i + σ_i ε_i

    For every σ the target of ``-∇E(x̃)`` is ``(x − x̃)/σ0²``: the energy's gradient is scaled as the score of
    the σ0-smoothed density, and the ``1/σ²`` weight balances the scales. The norm sums over all pixels; the
    batch is averaged. The paper logs the "normalised loss" ``σ0⁴ L``. ``∇E`` is taken with ``create_graph=True``
    so the loss back-propagates into the network (double back-propagation).
    """
    if sigmas.shape != (x.shape[0],):
        raise InputError(f"need one σ per image: {x.shape[0]} images, σ of shape {tuple(sigmas.shape)}")
    x_noisy = perturb(x, sigmas, generator)
    _, grad = energy_grad(energy_fn, x_noisy, create_graph=True)
    residual = (x.to(x_noisy.dtype) - x_noisy + sigma0**2 * grad.to(x_noisy.dtype)).flatten(1)
    weight = 1.0 / (sigmas.to(x.device, x_noisy.dtype) ** 2 * sigma0**4)
    return (residual.pow(2).sum(1) * weight).mean()


# ---------------------------------------------------------------------- sampling
def temperature_schedule(
    kind: str = "exp", steps: int | None = None, t_max: float = 100.0, t_min: float = 1.0
) -> torch.Tensor:
    """Temperatures of MDSM's annealed Langevin sampler (official ``sample.py``), one per step.

    Both schedules hold ``t_max`` for 500 steps, anneal over 2000 steps and cool linearly from ``t_min`` to 0
    over 200 steps. ``"exp"`` anneals geometrically, ``T_k = t_max·exp(−k·ln(t_max/t_min)/2000)``;
    ``"lin"`` linearly from ``t_max`` to ``t_min``. ``steps`` (default 2700, the paper's) shrinks or stretches
    the three phases in the same 500 : 2000 : 200 proportion, for CPU budgets.
    """
    check_name("temperature schedule", kind, TEMPERATURE_SCHEDULES)
    hold, anneal, cool = PAPER_SCHEDULE_STEPS
    if steps is not None:
        if steps < 3:
            raise InputError(f"a temperature schedule needs at least 3 steps, got {steps}")
        total = hold + anneal + cool
        hold, cool = max(1, round(steps * hold / total)), max(1, round(steps * cool / total))
        anneal = steps - hold - cool
    k = torch.arange(anneal, dtype=torch.float64)
    if kind == "exp":
        middle = t_max * torch.exp(-k * math.log(t_max / t_min) / anneal)
    else:
        middle = torch.linspace(t_max, t_min, anneal, dtype=torch.float64)
    return torch.cat(
        [
            torch.full((hold,), t_max, dtype=torch.float64),
            middle,
            t_min * torch.linspace(1.0, 0.0, cool, dtype=torch.float64),
        ]
    ).float()


def _as_mask(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=x.device)
    try:
        mask = torch.broadcast_to(mask.bool() if mask.dtype == torch.bool else mask != 0, x.shape)
    except RuntimeError:
        raise InputError(f"mask of shape {tuple(mask.shape)} does not broadcast to images {tuple(x.shape)}") from None
    return mask


@torch.no_grad()
def annealed_langevin(
    energy_fn: EnergyFn,
    x: torch.Tensor,
    temperatures: torch.Tensor,
    step_size: float = 0.02,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
    context_noise: float = SIGMA0,
) -> torch.Tensor:
    """Annealed Langevin dynamics on ``exp(−E/T)`` (official ``Annealed_Langevin_E``):

        x ← x − (ε²/2) ∇E(x) + ε √T_k z,   ε = ``step_size``, one step per temperature.

    With ``mask`` (True or 1 = pixel to sample) only masked pixels move (the official
    ``Annealed_Langevin_E_mask``): the known pixels are returned bit-for-bit unchanged, and the energy is
    evaluated with them noised by ``context_noise·T_k^(1/4)·z`` so the context roughly matches the noise level of
    the sampled region. Returns the last iterate (no denoising; see :func:`denoise`).
    """
    mask = _as_mask(mask, x)
    x = x.detach().to(_work_dtype(x)).clone()
    for temp in temperatures.tolist():
        if mask is None:
            _, grad = energy_grad(energy_fn, x)
            x = x - 0.5 * step_size**2 * grad + step_size * math.sqrt(temp) * gaussian_noise(x, generator)
        else:
            ctx = context_noise * temp**0.25 * gaussian_noise(x, generator)
            _, grad = energy_grad(energy_fn, torch.where(mask, x, x + ctx))
            moved = x - 0.5 * step_size**2 * grad + step_size * math.sqrt(temp) * gaussian_noise(x, generator)
            x = torch.where(mask, moved, x)
    return x


@torch.no_grad()
def denoise(
    energy_fn: EnergyFn, x: torch.Tensor, sigma0: float = SIGMA0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """MDSM's single-step denoising (empirical Bayes / Tweedie jump): ``x̂ = x − σ0² ∇E(x)``. The loss trains
    ``−σ0²∇E(x̃)`` towards ``x − x̃`` at every training σ, so one step denoises any noise level in that range.
    With ``mask``, only masked pixels change."""
    _, grad = energy_grad(energy_fn, x)
    x = x.detach().to(_work_dtype(x))
    out = x - sigma0**2 * grad
    mask = _as_mask(mask, x)
    return out if mask is None else torch.where(mask, out, x)


def sample(
    energy_fn: EnergyFn,
    shape: tuple[int, ...],
    temperatures: torch.Tensor | None = None,
    step_size: float = 0.02,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    init_mean: float = 0.5,
) -> torch.Tensor:
    """Unconditional samples: start at ``init_mean + N(0, I)`` (the official init), run
    :func:`annealed_langevin` (default: the paper's 2700-step ``"exp"`` schedule), then :func:`denoise`."""
    temperatures = temperature_schedule("exp") if temperatures is None else temperatures
    x = init_mean + torch.randn(shape, generator=generator).to(device)
    return denoise(energy_fn, annealed_langevin(energy_fn, x, temperatures, step_size, generator))


def inpaint(
    energy_fn: EnergyFn,
    images: torch.Tensor,
    mask: torch.Tensor,
    temperatures: torch.Tensor | None = None,
    step_size: float = 0.02,
    generator: torch.Generator | None = None,
    init_mean: float = 0.5,
    context_noise: float = SIGMA0,
) -> torch.Tensor:
    """Fill the masked pixels (``mask`` True or 1) of ``images`` (in [0, 1]) with annealed Langevin
    (:func:`annealed_langevin` with the mask) and a final masked :func:`denoise`. The masked pixels start at
    ``init_mean + N(0, I)``, as unconditional samples do (the official code ships no inpainting driver; this start
    is our choice). Known pixels are returned unchanged."""
    mask = _as_mask(mask, images)
    temperatures = temperature_schedule("exp") if temperatures is None else temperatures
    start = init_mean + gaussian_noise(images, generator)
    x = torch.where(mask, start, images.detach().to(start.dtype))
    x = annealed_langevin(energy_fn, x, temperatures, step_size, generator, mask=mask, context_noise=context_noise)
    return denoise(energy_fn, x, mask=mask)
