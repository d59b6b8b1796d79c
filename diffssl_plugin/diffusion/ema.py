"""Exponential moving average of weights (features and samples come from the EMA model, as in DDAE)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(step: int, max_decay: float, warmup: bool = True) -> float:
    """Decay at optimisation step ``step``: ``min(max_decay, (1 + step) / (10 + step))`` with warm-up.

    Short CPU runs never reach 0.9999, so without warm-up the EMA would stay close to the random
    initialisation; the warm-up form is diffusers' ``EMAModel`` default.
    """
    return min(max_decay, (1 + step) / (10 + step)) if warmup else max_decay


class EMA(nn.Module):
    """A frozen copy of a module whose parameters track ``decay * ema + (1 - decay) * live``.

    It is a plain sub-module, so Lightning checkpoints save and restore it with the model, and DDP ignores
    it (no parameter requires grad). Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = ema_decay(int(self.num_updates), self.decay, self.warmup)
        ema_p = list(self.module.parameters())
        live_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, live_p, 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
