"""Pretraining any registered learner with Lightning, under a stated compute budget.

``pretrain(method, dataset, budget, ...)`` trains with bf16 autocast (CPU or GPU), a progress bar,
checkpoints written atomically every few steps (``last.ckpt``, resumed exactly after an interruption), and
passes ``devices``/``strategy``/``num_nodes`` to Lightning so DDP across GPUs and nodes works. It returns a
:class:`PretrainResult` with the budget actually spent (steps, images, wall time, training FLOPs).
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, Timer

from ..data import DATASETS, load_split
from ..loading import export
from ..runtime import Runtime, current
from .base import SSLMethod, StartAt, StepBatches
from .registry import get_method
from .training_callbacks import AtomicCheckpointIO, BudgetProgressBar, ScheduleHorizon, WallClock


@dataclass(frozen=True)
class Budget:
    """Pretraining compute: wall-clock ``minutes``, training ``flops``, or optimisation ``steps`` (any mix;
    training stops at the first limit reached)."""

    minutes: float | None = None
    flops: float | None = None
    steps: int | None = None

    _UNITS: ClassVar[dict[str, str]] = {
        "min": "minutes",
        "m": "minutes",
        "s": "seconds",
        "flops": "flops",
        "steps": "steps",
    }

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``"4min"``, ``"90s"``, ``"2e13flops"``, ``"500steps"``, or several joined by ``,``."""
        kw: dict = {}
        for part in text.replace(" ", "").lower().split(","):
            m = re.fullmatch(r"([0-9.]+(?:e[+-]?[0-9]+)?)(min|m|s|flops|steps)", part)
            if not m:
                raise ValueError(f"cannot read budget {part!r}; use e.g. '4min', '90s', '2e13flops', '500steps'")
            value, unit = float(m.group(1)), cls._UNITS[m.group(2)]
            if unit == "seconds":
                unit, value = "minutes", value / 60
            kw[unit] = int(value) if unit == "steps" else value
        return cls(**kw)

    def max_steps(self, flops_per_step: float) -> int:
        limits = [self.steps] if self.steps is not None else []
        if self.flops is not None:
            limits.append(max(1, int(self.flops // flops_per_step)))
        return min(limits) if limits else -1

    def __str__(self) -> str:
        parts = [
            f"{self.minutes:g}min" if self.minutes is not None else "",
            f"{self.flops:.3g}flops" if self.flops is not None else "",
            f"{self.steps}steps" if self.steps is not None else "",
        ]
        return ",".join(p for p in parts if p) or "unlimited"


@dataclass
class PretrainResult:
    """What a pretraining run produced and spent."""

    method: str
    dataset: str
    out_dir: str
    checkpoint: str
    budget: str
    steps: int
    images_seen: int
    wall_seconds: float
    flops_per_image: float
    train_flops: float
    global_batch_size: int
    final_loss: float | None
    method_kwargs: dict = field(default_factory=dict)
    #: batches summed per optimisation step (``global_batch_size`` = images per optimisation step)
    accumulate_grad_batches: int = 1
    #: the optimisation steps the learning-rate schedule decays over (None: a constant rate, or not measured)
    schedule_horizon: int | None = None
    #: the Lightning precision the steps ran in (``bf16-mixed``, ``16-mixed``, ``32-true``; None in older records)
    precision: str | None = None

    def as_record(self) -> dict:
        return asdict(self)


#: the fields of a pretraining result that evaluation records carry as their ``budget``
BUDGET_FIELDS = (
    "budget",
    "steps",
    "images_seen",
    "wall_seconds",
    "train_flops",
    "flops_per_image",
    "global_batch_size",
)


def budget_spent(result: PretrainResult | dict) -> dict:
    """The ``budget`` field of a record: what pretraining spent (from a :class:`PretrainResult`, or the
    ``pretrain.json`` an export carries)."""
    fields = result if isinstance(result, dict) else result.as_record()
    return {k: fields.get(k) for k in BUDGET_FIELDS}


class StepDataModule(pl.LightningDataModule):
    """Feeds :class:`StepBatches` from the current global step, so a resumed run continues the same stream.

    Item ``m`` of the stream is micro-batch ``m``; with gradient accumulation ``a``, optimisation step ``s``
    takes micro-batches ``s·a … s·a + a − 1`` (``batch × a`` images per step)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, global_batch_size: int, seed: int, max_steps: int):
        super().__init__()
        self.images, self.labels, self.batch, self.seed = images, labels, global_batch_size, seed
        self.max_steps = max_steps if max_steps > 0 else 10**9

    def train_dataloader(self):
        trainer = self.trainer
        acc = trainer.accumulate_grad_batches
        data = StepBatches(
            self.images,
            self.labels,
            self.batch,
            self.seed,
            trainer.global_rank,
            trainer.world_size,
            self.max_steps * acc,
        )
        sampler = StartAt(trainer.global_step * acc, self.max_steps * acc)
        return torch.utils.data.DataLoader(data, batch_size=None, sampler=sampler, num_workers=0)


def build_model(method: str, num_classes: int, batch_size_per_device: int, in_chans: int, **method_kwargs) -> SSLMethod:
    """The registered learner ``method``; ``pretrain`` builds it without lightly's online classifier (the
    budget counts the learner's FLOPs only) unless ``method_kwargs`` asks for one."""
    entry = get_method(method)
    return entry["model"](
        batch_size_per_device=batch_size_per_device, num_classes=num_classes, in_chans=in_chans, **method_kwargs
    )


def pretrain(
    method: str,
    dataset: str = "fashion_mnist",
    budget: Budget = Budget(minutes=4),
    out_dir: str | os.PathLike = "runs/pretrain",
    batch_size: int = 128,
    data_root: str | None = None,
    runtime: Runtime | None = None,
    precision: str | None = None,
    resume: bool = True,
    progress: bool = True,
    seed: int = 0,
    checkpoint_every: int = 200,
    method_kwargs: dict | None = None,
    max_images: int | None = None,
    callbacks: list[Callback] | None = None,
    logger: pl.loggers.Logger | bool | None = None,
    accumulate_grad_batches: int = 1,
    horizon: Budget | None = None,
) -> PretrainResult:
    """Pretrain ``method`` on the ``trainval`` split of ``dataset`` (labels unused) within ``budget``.

    Hardware comes from ``runtime`` (default :func:`diffssl_plugin.runtime.current`: what the CLI's
    ``--accelerator/--devices/--strategy/--num-nodes/--precision`` set); ``precision`` overrides its
    precision (a paper config's own choice; bf16 runs in fp32 on a CPU that would only emulate it, see
    :meth:`~diffssl_plugin.runtime.Runtime.with_config_precision`). ``batch_size`` is the global batch; each of the
    ``devices × num_nodes`` processes takes its share. Every rank calls this and gets the result; rank 0 writes
    the export, and every rank returns once it is complete. ``callbacks`` and ``logger`` are passed to
    Lightning (default logger: CSV files under ``out_dir/logs``). ``accumulate_grad_batches`` sums the
    gradients of that many batches per optimisation step: a step then sees ``batch_size × accumulate_grad_batches``
    images, and the budget (steps, FLOPs, images seen) counts optimisation steps of that size.

    ``horizon`` (default: ``budget``) is the budget the learning-rate schedule decays over: a run stopped at
    ``budget`` and resumed later with a larger ``budget`` and the same ``horizon`` follows one schedule (the
    learning curves of ``diffssl bench --preset curve``). A horizon in minutes is turned into steps from the
    measured step time (:class:`~.training_callbacks.ScheduleHorizon`).
    """
    if accumulate_grad_batches < 1:
        raise ValueError(f"accumulate_grad_batches must be at least 1, got {accumulate_grad_batches}")
    rt = runtime or current()
    if precision is not None:
        rt = rt.with_config_precision(precision)
    rt.launch()
    out = Path(out_dir)
    method_kwargs = dict(method_kwargs or {})
    data = load_split(dataset, "trainval", root=data_root)
    if max_images:
        data = data.balanced_subset(total=max_images, seed=seed)
    pl.seed_everything(seed, workers=True, verbose=False)
    world = rt.requested_world_size
    per_device, rem = divmod(batch_size, world)
    if rem:
        raise ValueError(f"batch size {batch_size} is not divisible by {world} processes")
    if "hflip" in inspect.signature(get_method(method)["model"]).parameters:  # no mirrored digits
        method_kwargs.setdefault("hflip", DATASETS[dataset].hflip)
    model = build_model(
        method, data.num_classes, per_device, data.channels, seed=seed, **{"online_classifier": False, **method_kwargs}
    )
    flops_per_image = model.flops_per_image(data.take(torch.arange(min(8, len(data)))).floats())
    step_images = batch_size * accumulate_grad_batches
    max_steps = budget.max_steps(flops_per_image * step_images)
    timer = []
    if budget.minutes is not None:
        timer = [Timer(duration={"seconds": budget.minutes * 60}, interval="step")]
    horizon = horizon or budget
    schedule = ScheduleHorizon(
        horizon.minutes * 60 if horizon.minutes is not None else None,
        horizon.max_steps(flops_per_image * step_images),
    )
    trainer = pl.Trainer(
        **rt.trainer_kwargs(),
        max_steps=max_steps,
        max_epochs=-1,
        accumulate_grad_batches=accumulate_grad_batches,
        plugins=[AtomicCheckpointIO()],
        logger=pl.loggers.CSVLogger(str(out), name="logs") if logger is None else logger,
        callbacks=[
            ModelCheckpoint(
                dirpath=str(out / "checkpoints"),
                save_last=True,
                save_top_k=0,
                every_n_train_steps=checkpoint_every,
                enable_version_counter=False,
            ),
            WallClock(),
            schedule,
            *timer,
            *([BudgetProgressBar(str(budget))] if progress else []),
            *(callbacks or []),
        ],
        enable_progress_bar=progress,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        default_root_dir=str(out),
    )
    if trainer.world_size != world:
        raise RuntimeError(f"Lightning runs {trainer.world_size} processes, the runtime asked for {world}")
    datamodule = StepDataModule(data.images, data.labels, batch_size, seed, max_steps)
    last = out / "checkpoints" / "last.ckpt"
    with warnings.catch_warnings():  # pretraining has no validation loader; the learner's val step is for lightly's
        warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`")
        trainer.fit(
            model, datamodule=datamodule, ckpt_path=str(last) if resume and last.is_file() else None, weights_only=True
        )
    if trainer.global_step > 0:  # every rank takes part (a barrier); rank 0 writes atomically (AtomicCheckpointIO)
        trainer.save_checkpoint(str(last), weights_only=False)
    steps = trainer.global_step
    wall = next(c for c in trainer.callbacks if isinstance(c, WallClock)).seconds()
    loss = trainer.callback_metrics.get("train_loss")
    result = PretrainResult(
        method=method,
        dataset=dataset,
        out_dir=str(out),
        checkpoint=str(last),
        budget=str(budget),
        steps=steps,
        images_seen=steps * step_images,
        wall_seconds=round(wall, 2),
        flops_per_image=flops_per_image,
        train_flops=flops_per_image * step_images * steps,
        global_batch_size=step_images,
        final_loss=float(loss) if loss is not None else None,
        method_kwargs=method_kwargs,
        accumulate_grad_batches=accumulate_grad_batches,
        schedule_horizon=schedule.horizon if model.cosine_decay else None,
        precision=rt.precision_of(model),
    )
    if trainer.is_global_zero:
        export(model, out / "export", result)
    rt.barrier()  # the export is complete before any rank reads it
    return result
