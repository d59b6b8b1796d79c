"""The one learning-rate schedule of the package: linear warm-up, then cosine decay.

Every optimiser here (the learners, the fine-tuning protocol, the heads, the segmentation heads) takes its
schedule from :func:`warmup_cosine`, which is lightly's ``CosineWarmupScheduler`` (the schedule of lightly's
benchmark modules) when the number of steps is known. A budget in minutes has no known end: the rate then
stays constant after the warm-up (torch's ``LinearLR`` warm-up).
"""

from __future__ import annotations

import torch
from lightly.utils.scheduler import CosineWarmupScheduler


class _CosineWarmup(CosineWarmupScheduler):
    """lightly's scheduler, held at its end value after ``max_epochs`` (Lightning steps a scheduler once more
    after the last optimisation step, which lightly would warn about)."""

    def scale_lr(self, epoch: int) -> float:
        return super().scale_lr(min(epoch, self.max_epochs))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int | None, end_value: float = 0.0
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step scheduler: factor ``(s+1)/warmup`` for ``s < warmup``, then cosine from 1 to ``end_value``
    at step ``total_steps - 1`` (lightly's convention); constant 1 after the warm-up when ``total_steps`` is
    ``None``/non-positive. Step it once per optimisation step."""
    warmup = max(1, int(warmup_steps))
    if total_steps is not None and total_steps > warmup:
        return _CosineWarmup(
            optimizer, warmup_epochs=warmup, max_epochs=int(total_steps), start_value=1.0, end_value=end_value
        )
    if warmup == 1:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup - 1)
