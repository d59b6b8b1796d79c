"""Learning-rate schedule shared by the baselines: linear warm-up, then cosine decay to zero over the step
budget when it is known (``trainer.max_steps > 0``), else constant (a budget in minutes has no known end)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int | None):
    """``LambdaLR`` with factor ``(s+1)/warmup`` during warm-up, then ``½(1 + cos(π·progress))`` up to
    ``total_steps``."""
    warmup = max(1, int(warmup_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not total_steps or total_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
