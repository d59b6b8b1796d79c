"""The one learning-rate schedule of the package: linear warm-up, then cosine decay.

Every optimiser here (the learners, the fine-tuning protocol, the heads, the segmentation heads) takes its
schedule from :func:`warmup_cosine`, which is lightly's ``CosineWarmupScheduler`` (the schedule of lightly's
benchmark modules). Its horizon may be set after the optimiser is built (:meth:`CosineWarmup.set_horizon`):
a wall-clock budget has no step count until the step time is measured (see
:class:`~diffssl_plugin.methods.training_callbacks.ScheduleHorizon`). Until a horizon is known the rate stays constant
after the warm-up.
"""

from __future__ import annotations

import torch
from lightly.utils.scheduler import CosineWarmupScheduler


class CosineWarmup(CosineWarmupScheduler):
    """lightly's scheduler with a horizon that may be unknown (``max_epochs=None``: warm-up, then constant) or
    set later, held at its end value after the horizon (Lightning steps a scheduler once more after the last
    optimisation step, which lightly would warn about). The horizon is a plain int in the state dict, so a
    resumed run keeps it."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int | None, end_value: float = 0.0
    ):
        self.total_steps = total_steps if total_steps is not None and total_steps > 0 else None
        super().__init__(
            optimizer,
            warmup_epochs=max(1, int(warmup_steps)),
            max_epochs=self.total_steps or 1,
            start_value=1.0,
            end_value=end_value,
        )

    def set_horizon(self, total_steps: int) -> None:
        """Decay over ``total_steps`` optimisation steps from now on (the next ``step()`` uses it)."""
        self.total_steps = max(int(total_steps), self.warmup_epochs + 1)

    def scale_lr(self, epoch: int) -> float:
        if self.total_steps is None or self.total_steps <= self.warmup_epochs:
            return min(1.0, (epoch + 1) / self.warmup_epochs)  # lightly's warm-up ramp, then constant
        self.max_epochs = self.total_steps
        return super().scale_lr(min(epoch, self.total_steps))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int | None, end_value: float = 0.0
) -> CosineWarmup:
    """A per-step scheduler: factor ``(s+1)/warmup`` for ``s < warmup``, then cosine from 1 to ``end_value``
    at step ``total_steps - 1`` (lightly's convention); constant 1 after the warm-up while ``total_steps`` is
    ``None``/non-positive (until :meth:`CosineWarmup.set_horizon`). Step it once per optimisation step."""
    return CosineWarmup(optimizer, warmup_steps, total_steps, end_value)
