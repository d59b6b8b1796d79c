"""Exponential moving average of weights (features and samples come from the EMA model, as in DDAE).

Two decay warm-ups (:data:`EMA_WARMUPS`), ``s`` being the number of updates made before this one:

* ``"ema_pytorch"``: ``min(β, max(min_value, 1 − (1 + s/inv_gamma)^(−power)))`` with ema-pytorch's defaults
  ``inv_gamma = 1``, ``power = 2/3``, ``min_value = 0``. This is what DDAE's ``train.py`` gets from
  ``ema_pytorch.EMA(model, beta=0.9999, update_after_step=0, update_every=1)``: ema-pytorch 0.8.3's first
  ``update()`` copies the weights (decay 0 = ``s = 0`` here) and its n-th averages with
  ``get_current_decay() = 1 − n^(−2/3)`` (``step = n``, ``epoch = step − update_after_step − 1``), i.e.
  ``s = n − 1``. The horizon ``1/(1 − decay)`` grows as ``s^(2/3)``: about 8.6k steps after 800k updates
  (DDAE's 800 epochs at batch 512 are 78k updates: a horizon of about 1.8k, where diffusers' warm-up gives
  8.7k), so β = 0.9999 is reached only
  after 1M updates.
* ``"diffusers"``: ``min(β, (1 + s)/(10 + s))``, diffusers' ``EMAModel`` default (horizon ``(10 + s)/9``).
* ``"none"``: β from the first update.

Buffers are copied from the live model, not averaged (ema-pytorch averages floating buffers; the U-Nets here
have none, so DDAE is unaffected).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import check_name

#: the decay warm-ups :func:`ema_decay` knows (see the module docstring)
EMA_WARMUPS = ("ema_pytorch", "diffusers", "none")


def ema_decay(
    step: int,
    max_decay: float,
    warmup: bool | str = True,
    inv_gamma: float = 1.0,
    power: float = 2 / 3,
    min_value: float = 0.0,
) -> float:
    """Decay of update number ``step`` (0 = the first) under ``warmup`` (a name of :data:`EMA_WARMUPS`;
    ``True`` is ``"diffusers"``, ``False`` is ``"none"``, for older callers). ``inv_gamma``, ``power`` and
    ``min_value`` are ema-pytorch's arguments, with its defaults.

    Short CPU runs never reach 0.9999, so without warm-up the EMA would stay close to the random
    initialisation.
    """
    name = {True: "diffusers", False: "none"}.get(warmup, warmup) if isinstance(warmup, bool) else warmup
    name = check_name("EMA warm-up", name, EMA_WARMUPS)
    if name == "none":
        return max_decay
    if name == "diffusers":
        return min(max_decay, (1 + step) / (10 + step))
    if step <= 0:
        return 0.0  # ema-pytorch's first update copies the weights
    value = 1 - (1 + step / inv_gamma) ** -power
    return min(max_decay, max(min_value, value))


class EMA(nn.Module):
    """A frozen copy of a module whose parameters track ``decay * ema + (1 - decay) * live``.

    It is a plain sub-module, so Lightning checkpoints save and restore it with the model, and DDP ignores
    it (no parameter requires grad). Buffers are copied, not averaged. ``warmup``: see :func:`ema_decay`.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool | str = True):
        super().__init__()
        ema_decay(0, decay, warmup)  # an unknown warm-up name fails here, not at the first step
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
