"""One training helper for every small supervised loop: heads on frozen features (attention, DifFormer, DifFeed),
fine-tuning (all weights, LP-FT) and the segmentation heads (linear, pixel-MLP ensemble).

:func:`fit` trains a model with a Lightning ``Trainer`` built from the command's :mod:`~diffssl_plugin.runtime`
(accelerator, devices, strategy, nodes), so every loop runs on the accelerator and under DDP. A loop keeps its
own recipe and says it in a few arguments: the epoch plan (which rows make each global batch), how rows are
loaded and scored, its optimiser and per-step schedule, the precision (fp32 or bf16 autocast: the loop's
choice, whatever the runtime's), and how often validation picks the epoch kept.

**Several processes take the steps one process takes.** Every rank draws the same seeded epoch plan (the
permutation a single process would use) and takes the r-th contiguous part of each global batch (parts differ
in length by at most one). Its loss is weighted by its share of the batch (of the counted terms, for a loss
given as a sum and a count: pixels that are not ignored), so that DDP's gradient average is the gradient of the
whole batch's mean loss, whatever the batch size. A batch with fewer rows than processes is skipped (one
process never skips). On GPUs BatchNorm layers become ``SyncBatchNorm`` (statistics of the whole batch); on
CPUs torch has no synchronised BatchNorm, so each rank normalises with its own part's statistics.
Random draws inside the model (DifFeed's noise, dropout) follow one stream per rank, as its rows are other
images; afterwards every rank continues rank 0's stream. Validation runs on every rank (same weights, same
result) and rank 0's score is broadcast, so every rank keeps the same epoch; the best epoch's weights are
restored on every rank.

On one process the steps are the hand-written loops' own: the same permutations, batches, optimiser and
schedule steps; the loss and validation are unchanged, so scores agree to float noise.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.strategies import DDPStrategy
from torch import nn

from .backbones.memory_format import use_preferred_memory_format
from .backbones.sdpa import cpu_math_attention
from .runtime import Runtime, current

Plan = Callable[[], Sequence[torch.Tensor]]  # one epoch's global batches: row tensors (rows along dim 0)


def shuffled_batches(
    n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True, min_rows: int = 1
) -> Plan:
    """An epoch plan: a fresh permutation of ``range(n)`` from ``generator`` cut into batches of
    ``batch_size``. ``drop_last``: full batches only (one batch of all ``n`` rows when ``n < batch_size``);
    else the last, smaller batch too when it has at least ``min_rows`` rows."""

    def plan() -> list[torch.Tensor]:
        perm = torch.randperm(n, generator=generator)
        if drop_last:
            size = min(batch_size, n)
            return list(perm[: n // size * size].split(size))
        return [b for b in perm.split(batch_size) if len(b) >= min_rows]

    return plan


class RankBatches:
    """Sampler of this rank's parts of each epoch's global batches, with the part's share of the batch
    (``world_size × part rows / batch rows``: 1 for equal parts). Epoch 0 is drawn at once (Lightning asks for
    the length first), every later epoch when its iteration starts, so the plan's generator is used in the
    order one process uses it."""

    def __init__(self, plan: Plan, rank: int = 0, world_size: int = 1):
        self.plan, self.rank, self.world_size = plan, rank, world_size
        self.steps = self.rows = 0
        self._next = self._draw()
        self._length = len(self._next)

    def _draw(self) -> list[torch.Tensor]:
        return [b for b in self.plan() if len(b) >= self.world_size]

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, float]]:
        batches, self._next = self._next if self._next is not None else self._draw(), None
        if len(batches) != self._length:
            raise RuntimeError(f"the epoch plan gave {len(batches)} batches, earlier epochs {self._length}")
        for batch in batches:
            per, extra = divmod(len(batch), self.world_size)
            start = self.rank * per + min(self.rank, extra)
            part = batch[start : start + per + (self.rank < extra)]
            self.steps += 1
            self.rows += len(batch)
            yield part, self.world_size * len(part) / len(batch)


class _Loaded(torch.utils.data.Dataset):
    """``loader[(rows, share)]`` → ``(load(rows), share)``: the sampler's items, loaded on the CPU."""

    def __init__(self, load: Callable[[torch.Tensor], Any]):
        self.load = load

    def __getitem__(self, item):
        rows, share = item
        return self.load(rows), share


@dataclass
class FitResult:
    """What :func:`fit` reached: the kept epoch, the per-epoch history and the cost."""

    best_score: float | None  # validation score of the kept epoch (None without validation)
    best_epoch: int  # 1-based; 0: the start (``start_score``); the last epoch without validation
    history: list[dict] = field(default_factory=list)  # {"epoch", "loss"[, "val"]} per epoch
    train_seconds: float = 0.0  # optimisation only (no validation)
    steps: int = 0  # optimiser steps
    rows_seen: int = 0  # rows of every global batch trained on


class SupervisedModule(pl.LightningModule):
    """The LightningModule :func:`fit` trains: ``net`` with the loop's plan, loss, optimiser and selection."""

    def __init__(
        self,
        net: nn.Module,
        plan: Plan,
        load: Callable,
        loss: Callable,
        optimizer,
        scheduler,
        epochs: int,
        validate: Callable | None,
        validate_every: int,
        start_score: float | None,
        select_best: bool,
        snapshot: Callable,
        train_mode: bool,
        check_loss: bool,
        desc: str,
    ):
        super().__init__()
        self.net = net
        self.plan, self.load, self.loss = plan, load, loss
        self.optimizer, self.scheduler = optimizer, scheduler
        self.epochs, self.validate, self.validate_every = epochs, validate, validate_every
        self.start_score, self.select_best, self.snapshot = start_score, select_best, snapshot
        self.train_mode, self.check_loss, self.desc = train_mode, check_loss, desc
        self.best: tuple[float | None, int, dict | None] = (start_score, 0, None)
        self.history: list[dict] = []
        self.seconds = 0.0
        self.sampler: RankBatches | None = None
        self.trained_on = torch.device("cpu")

    def train_dataloader(self):
        self.sampler = RankBatches(self.plan, self.trainer.global_rank, self.trainer.world_size)
        # own generator: the DataLoader's per-epoch seed draw must not move the global stream the model draws from
        return torch.utils.data.DataLoader(
            _Loaded(self.load), batch_size=None, sampler=self.sampler, num_workers=0, generator=torch.Generator()
        )

    def configure_optimizers(self):
        if self.scheduler is None:
            return self.optimizer
        return {"optimizer": self.optimizer, "lr_scheduler": {"scheduler": self.scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        self.trained_on = self.device
        if self.start_score is not None:
            self.best = (self.start_score, 0, self.snapshot(self.net))

    def on_train_epoch_start(self) -> None:
        self.net.train(self.train_mode)
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._steps = 0
        self._started = time.perf_counter()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        data, share = batch
        with cpu_math_attention(self.device):
            loss = self.loss(self.net, data)
        world = self.trainer.world_size
        if isinstance(loss, tuple):  # (sum of the terms, how many): divided by the count over every rank
            loss, count = loss
            total = self.trainer.strategy.reduce(count.detach().float().clone(), reduce_op="sum")
            loss = loss / total.clamp_min(1)
            if world > 1:
                loss = loss * world
        elif share != 1.0:
            loss = loss * share
        self._loss_sum += loss.detach().double()
        self._steps += 1
        return loss

    def on_train_epoch_end(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - self._started
        epoch = self.current_epoch + 1
        loss_sum = self.trainer.strategy.reduce(self._loss_sum.clone(), reduce_op="sum")
        loss = float(loss_sum) / self.trainer.world_size / max(1, self._steps)
        if self.check_loss and not math.isfinite(loss):
            raise FloatingPointError(f"{self.desc}: loss became {loss} in epoch {epoch}; lower the lr")
        entry = {"epoch": epoch, "loss": loss}
        if self.validate is not None and (epoch % self.validate_every == 0 or epoch == self.epochs):
            entry["val"] = self.trainer.strategy.broadcast(float(self.validate(self.net, self.device)))
            score, _, state = self.best
            if state is None or entry["val"] > score or not self.select_best:
                self.best = (entry["val"], epoch, self.snapshot(self.net))
        self.history.append(entry)


class _EpochBar(TQDMProgressBar):
    """Lightning's bar, titled ``desc epoch/epochs``, showing the last epoch's loss and validation score."""

    def __init__(self, desc: str):
        super().__init__(leave=False)
        self.desc = desc

    def on_train_epoch_start(self, trainer: pl.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"{self.desc} {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def get_metrics(self, trainer: pl.Trainer, pl_module: SupervisedModule) -> dict:
        last = pl_module.history[-1] if pl_module.history else {}
        return {k: round(v, 4) for k, v in last.items() if k != "epoch"}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's per-Trainer notices (devices found, ``max_epochs`` reached, few workers, frozen modules in
    eval mode) silenced: these loops build a Trainer per head or fine-tuning run."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in (".*does not have many workers", ".*module\\(s\\) in eval mode", ".*LeafSpec.*deprecated"):
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class _RankStreams(pl.Callback):
    """Under several processes: each rank's own random stream while training (its rows are other images), and
    rank 0's stream on every rank afterwards (so later draws agree across ranks)."""

    def __init__(self):
        self.seed = int(torch.randint(2**62, ()))  # drawn before fit: the same on every rank

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.manual_seed(self.seed + trainer.global_rank)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        cpu, cuda = trainer.strategy.broadcast((torch.get_rng_state(), cuda))
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def resolve_runtime(device: str | torch.device | None = None, runtime: Runtime | None = None) -> Runtime:
    """The runtime a loop trains under: ``runtime`` (default: the command's), unless ``device`` names another
    kind of device, which then trains alone in this process."""
    rt = runtime or current()
    if device is None or torch.device(device).type == rt.device_type:
        return rt
    return Runtime(accelerator=torch.device(device).type)


def fit(
    model: nn.Module,
    plan: Plan,
    load: Callable[[torch.Tensor], Any],
    loss: Callable[[nn.Module, Any], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    epochs: int,
    validate: Callable[[nn.Module, torch.device], float] | None = None,
    validate_every: int = 1,
    start_score: float | None = None,
    select_best: bool = True,
    snapshot: Callable[[nn.Module], dict] | None = None,
    train_mode: bool = True,
    amp: bool = False,
    unused_parameters: bool = False,
    check_loss: bool = True,
    desc: str = "training",
    progress: bool = False,
    device: str | torch.device | None = None,
    runtime: Runtime | None = None,
) -> FitResult:
    """Train ``model`` for ``epochs`` epochs on the runtime's devices and restore the kept epoch's weights.

    * ``plan()``: one epoch's global batches (row tensors, rows along dim 0), drawn once per epoch;
      ``load(rows)`` turns this rank's part of a batch into the model's input on the CPU (Lightning moves it
      to the device); ``loss(model, batch)`` gives the part's mean loss, or ``(sum, count)`` when the mean is
      over a count the rows do not fix (pixels not ignored).
    * ``optimizer`` over the trainable parameters, ``scheduler`` stepped after every optimiser step.
    * ``validate(model, device)`` every ``validate_every`` epochs and after the last: the epoch with the
      highest score is kept (``select_best=False``: the last validated one); ``start_score``: the score of
      the weights before training (epoch 0, kept if no epoch beats it). ``snapshot(model)``: the tensors that
      restore an epoch (default: the whole state dict).
    * ``train_mode``: the mode the model trains in (False: BatchNorm statistics and dropout frozen);
      ``amp``: mixed precision where it is fast (``precision="auto"``: bf16; fp16 on GPUs without bf16; fp32
      on CPUs without bf16 hardware), else fp32; ``unused_parameters``: the forward leaves the
      same trainable parameters out at every step (a backbone read at an inner block; DDP's static graph);
      ``check_loss``: a non-finite epoch loss raises :class:`FloatingPointError`.
    """
    rt = resolve_runtime(device, runtime)
    distributed = rt.distributed
    use_preferred_memory_format(model)
    module = SupervisedModule(
        model,
        plan,
        load,
        loss,
        optimizer,
        scheduler,
        epochs,
        validate,
        validate_every,
        start_score,
        select_best,
        snapshot or (lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}),
        train_mode,
        check_loss,
        desc,
    )
    kwargs = rt.trainer_kwargs()
    kwargs.update(
        precision=replace(rt, precision="auto").lightning_precision if amp else "32-true",
        sync_batchnorm=distributed and rt.device_type == "cuda",
    )  # torch's SyncBatchNorm needs a GPU
    if distributed and unused_parameters and kwargs["strategy"] in ("auto", "ddp"):
        kwargs["strategy"] = DDPStrategy(static_graph=True)  # finds the unused ones once, not at every step
    callbacks = ([_EpochBar(desc)] if progress else []) + ([_RankStreams()] if distributed else [])
    with _quiet():
        trainer = pl.Trainer(
            **kwargs,
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            callbacks=callbacks,
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(module)
    model.to(module.trained_on)  # Lightning's teardown moved it to the CPU
    score, epoch, state = module.best
    if state is not None:
        model.load_state_dict(state, strict=False)
    sampler = module.sampler  # None when there was nothing to train (epochs=0)
    return FitResult(
        best_score=score,
        best_epoch=epoch if state is not None else epochs,
        history=module.history,
        train_seconds=module.seconds,
        steps=sampler.steps if sampler else 0,
        rows_seen=sampler.rows if sampler else 0,
    )


__all__ = [
    "FitResult",
    "RankBatches",
    "SupervisedModule",
    "fit",
    "resolve_runtime",
    "shuffled_batches",
]
