"""The Lightning plugins and callbacks of :func:`~diffssl_plugin.methods.training.pretrain`: atomic checkpoint
writes, wall time carried across resumes, the cosine horizon of a time budget, and the budget's progress bar."""

from __future__ import annotations

import os
import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from pytorch_lightning.plugins import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``CheckpointIO`` plugin (public API) that writes each checkpoint to ``<path>.partial`` and
    renames it into place, so a process killed mid-write never leaves a half-written file to be resumed."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        partial = f"{path}.partial"
        super().save_checkpoint(checkpoint, partial, storage_options=storage_options)
        os.replace(partial, path)


class WallClock(Callback):
    """Training wall time, carried across resumes in the checkpoint (like Lightning's ``Timer``, which
    ``pretrain`` adds for a time budget: both are callbacks with state, saved in and restored from it)."""

    def __init__(self):
        self.elapsed, self._start = 0.0, None

    def on_train_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.elapsed += time.perf_counter() - self._start
        self._start = None

    def seconds(self) -> float:
        return self.elapsed + (time.perf_counter() - self._start if self._start else 0.0)

    def state_dict(self):
        return {"elapsed": self.seconds()}

    def load_state_dict(self, state_dict):
        self.elapsed = float(state_dict["elapsed"])


class ScheduleHorizon(Callback):
    """Sets the learner's cosine horizon (in optimisation steps) for a budget given in wall-clock time.

    A step budget's horizon is known up front; a time budget's is not. This callback starts timing ``skip``
    steps into the run (the first steps pay one-off allocation costs) and, every ``every`` steps after that,
    sets the horizon to the current step plus the steps the remaining time allows at the mean step time
    measured so far (rank 0's figure, broadcast at the same step on every rank so all processes decay alike),
    capped by ``max_steps`` when a step or FLOP budget also applies. Re-estimating follows a machine whose
    speed drifts (a single early estimate on a briefly busy machine ended a SimCLR cosine at step 62 of 98).
    The horizon is saved in and restored from checkpoints, so a resumed run continues the same schedule (and a
    longer run can be resumed toward the same horizon: ``pretrain(horizon=...)``). Learners without cosine
    decay (DDAE, DRL: constant rates) are left alone.

    Our choice where the papers give none (they count epochs, a horizon known in advance)."""

    def __init__(self, seconds: float | None, max_steps: int = -1, every: int = 10, skip: int = 2):
        self.seconds, self.max_steps, self.every, self.skip = seconds, max_steps, every, skip
        self.horizon: int | None = None
        self._begin = 0  # the global step this process started training at (a resumed run's is > 0)
        self._timed_from: tuple[int, float] | None = None  # (step, time) the timing started at
        self._last_step = -1

    def on_train_start(self, trainer, pl_module):
        self._begin, self._timed_from, self._last_step = trainer.global_step, None, -1
        if self.seconds is None and self.max_steps > 0:
            self.horizon = self.max_steps
        self._apply(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.seconds is None or step == self._last_step:  # once per optimisation step (accumulation)
            return
        self._last_step = step
        if step == self._begin + self.skip:
            self._timed_from = (step, time.perf_counter())
        if self._timed_from is None or step == self._timed_from[0] or (step - self._timed_from[0]) % self.every:
            return
        per_step = (time.perf_counter() - self._timed_from[1]) / (step - self._timed_from[0])
        wall = next(c for c in trainer.callbacks if isinstance(c, WallClock)).seconds()
        horizon = step + int(max(0.0, self.seconds - wall) / per_step)
        horizon = min(horizon, self.max_steps) if self.max_steps > 0 else horizon
        self.horizon = int(trainer.strategy.broadcast(horizon, src=0))
        self._apply(trainer)

    def _apply(self, trainer) -> None:
        if self.horizon is None:
            return
        for config in trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "set_horizon") and getattr(trainer.lightning_module, "cosine_decay", False):
                config.scheduler.set_horizon(self.horizon)

    def state_dict(self):
        return {"horizon": self.horizon}

    def load_state_dict(self, state_dict):
        self.horizon = state_dict.get("horizon")


class BudgetProgressBar(TQDMProgressBar):
    """Lightning's bar, with the step budget as its total (an open count for time budgets: the data stream
    itself is unbounded) and the budget (its text, e.g. ``"2.5min"``) in its description."""

    def __init__(self, budget: str):
        super().__init__()
        self.budget = budget

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        left = max(0, max_steps - self.trainer.global_step) * self.trainer.accumulate_grad_batches
        return left if max_steps > 0 else float("inf")

    def on_train_epoch_start(self, trainer: pl.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"pretrain (budget {self.budget})")
