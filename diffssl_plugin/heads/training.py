"""Training heads on a frozen backbone: the only place labels are used.

**Protocol.** The backbone is frozen (never in the optimiser). A head trains with cross-entropy on the train
split; the validation split picks the epoch kept (its accuracy is measured every ``eval_every`` epochs and the
best head is restored); the test split is scored once by the caller. Presets (:data:`TRAINING_PRESETS`):

* ``"small"`` (default, our choice for 10k-image CPU runs): AdamW (lr 3e-3, weight decay 0.05), linear
  warm-up for 1 epoch, cosine decay, batch 128, 10 epochs, fp32. On 5k Fashion-MNIST maps, 8 epochs reached
  79.4% validation accuracy at lr 3e-3 vs 75.0% at 1e-3 (20 epochs: 84.4%); bf16 autocast made the small
  heads slower on a CPU (75 vs 178 images/s for the 64-wide attention head); DifFeed turns it on for its
  U-Net passes.
* ``"paper"``: diffssl's attention / DifFormer recipe: SGD without momentum or weight decay, lr 5e-2, step
  decay ×0.1 every 7 epochs, 28 epochs, batch 128, validation every 7 epochs. ``"paper_diffeed"``: lr 1e-2,
  batch 16 (diffssl's global batch), and the feedback BatchNorm in eval mode (frozen running statistics; its
  affine weights still train) from epoch 7 on, as diffssl's feedback training does (``freeze_bn_epoch``; we
  read "epoch 7" 0-based: the first 7 epochs update the statistics, the rest, after the first ×0.1 decay, use
  them). ``"paper_linear"``: lr 1e-2.

**Inputs.** A head trains on a :class:`Rows` source: row indices → the model's input for those rows.
Attention and DifFormer heads train on cached frozen feature maps (:func:`tensor_rows`, :func:`dict_rows`),
DifFeed on images (:func:`image_rows`): its pass 2 depends on the trainable feedback, so nothing is cached.
Cached maps cost ``4·C·s·s`` bytes per image and block (float32, pooled to the head's s × s, which is exact:
the pre-layer's first step is that pooling): 12.5 kB per image for a 64-channel 7×7 map, so 125 MB for 10k
images; DifFormer multiplies this by blocks × timesteps.

**Hardware.** :func:`train_head` trains through :func:`diffssl_plugin.supervised.fit`: on the command's
devices, and under DDP several processes take the steps one process takes.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

from ..backbones.sdpa import cpu_math_attention
from ..errors import InputError, check_name
from ..optim import warmup_cosine
from ..runtime import Runtime, inference_batch_size, mixed_precision
from ..supervised import fit, shuffled_batches


@dataclass(frozen=True)
class HeadTraining:
    """How a head trains (see the module docstring for the presets)."""

    optimizer: str = "adamw"  # "adamw" or "sgd"
    lr: float = 3e-3
    weight_decay: float = 0.05
    momentum: float = 0.0  # SGD only
    epochs: int = 10
    batch_size: int = 128
    schedule: str = "cosine"  # "cosine", "step" or "constant"
    warmup_epochs: float = 1.0
    step_epochs: int = 7  # "step": multiply the lr by gamma every step_epochs epochs
    gamma: float = 0.1
    eval_every: int = 1  # validation every this many epochs (and after the last)
    amp: bool = False  # mixed precision where the device computes it fast (runtime.mixed_precision)
    seed: int = 0
    freeze_bn_epoch: int | None = None  # BatchNorm layers run in eval mode from this (0-based) epoch on

    def __post_init__(self):
        check_name("optimizer", self.optimizer, ("adamw", "sgd"))
        check_name("schedule", self.schedule, ("cosine", "step", "constant"))
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise InputError(f"head training needs epochs ≥ 1, batch_size ≥ 1 and lr > 0, got {self}")
        if self.freeze_bn_epoch is not None and self.freeze_bn_epoch < 0:
            raise InputError(f"freeze_bn_epoch must be ≥ 0 or None, got {self.freeze_bn_epoch}")


TRAINING_PRESETS: dict[str, HeadTraining] = {
    "small": HeadTraining(),
    "paper": HeadTraining(
        optimizer="sgd",
        lr=5e-2,
        weight_decay=0.0,
        momentum=0.0,
        epochs=28,
        batch_size=128,
        schedule="step",
        warmup_epochs=0.0,
        step_epochs=7,
        gamma=0.1,
        eval_every=7,
    ),
    "paper_linear": HeadTraining(
        optimizer="sgd",
        lr=1e-2,
        weight_decay=0.0,
        epochs=28,
        batch_size=128,
        schedule="step",
        warmup_epochs=0.0,
        step_epochs=7,
        gamma=0.1,
        eval_every=7,
    ),
    "paper_diffeed": HeadTraining(
        optimizer="sgd",
        lr=1e-2,
        weight_decay=0.0,
        epochs=28,
        batch_size=16,
        schedule="step",
        warmup_epochs=0.0,
        step_epochs=7,
        gamma=0.1,
        eval_every=7,
        freeze_bn_epoch=7,
    ),
}


def training_preset(name: str = "small", **overrides) -> HeadTraining:
    """Preset ``name`` with ``overrides`` (field names of :class:`HeadTraining`)."""
    unknown = set(overrides) - set(HeadTraining.__dataclass_fields__)
    if unknown:
        raise InputError(
            f"unknown head-training settings {sorted(unknown)}; valid: {', '.join(HeadTraining.__dataclass_fields__)}"
        )
    return replace(TRAINING_PRESETS[check_name("training preset", name, TRAINING_PRESETS)], **overrides)


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class Rows:
    """A labelled data source: ``get(indices)`` gives the model's input for those rows."""

    get: Callable[[torch.Tensor], Any]
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def tensor_rows(x: torch.Tensor, labels: torch.Tensor) -> Rows:
    """Rows of a cached feature tensor (N, …)."""
    _check_len(len(x), labels)
    return Rows(lambda idx: x[idx], labels)


def dict_rows(feats: dict, labels: torch.Tensor) -> Rows:
    """Rows of several cached features ``{key: (N, …)}`` (a DifFormer's ``(timestep, block)`` maps)."""
    for v in feats.values():
        _check_len(len(v), labels)
    return Rows(lambda idx: {k: v[idx] for k, v in feats.items()}, labels)


def image_rows(
    images_uint8: torch.Tensor, labels: torch.Tensor, normalise: Callable[[torch.Tensor], torch.Tensor]
) -> Rows:
    """Rows of uint8 images, normalised to the backbone's input range on the fly."""
    _check_len(len(images_uint8), labels)
    return Rows(lambda idx: normalise(images_uint8[idx].float().div_(255.0)), labels)


def _check_len(n: int, labels: torch.Tensor) -> None:
    if n != len(labels):
        raise InputError(f"{n} inputs but {len(labels)} labels")


def _to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def nbytes(obj) -> int:
    """Bytes held by a tensor or a dict of tensors (what a cached feature costs in memory)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return sum(nbytes(v) for v in obj.values())


# ---------------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    """What training a head cost and reached."""

    val_acc: float | None
    best_epoch: int
    train_seconds: float  # optimisation only (no validation)
    images_seen: int
    trainable_params: int
    param_names: list[str]
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images_seen / self.train_seconds if self.train_seconds > 0 else float("nan")


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters an optimiser may change: those with ``requires_grad`` (a frozen backbone has none)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(params: Sequence[nn.Parameter], cfg: HeadTraining, steps_per_epoch: int):
    """The optimiser and a per-step LR schedule (warm-up, then cosine / step decay / constant)."""
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule != "step":  # the package's one warm-up + cosine schedule; constant after the warm-up
        return opt, warmup_cosine(opt, warmup, total if cfg.schedule == "cosine" else None)
    decay = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_epochs * steps_per_epoch, gamma=cfg.gamma)
    if warmup <= 0:
        return opt, decay
    ramp = warmup_cosine(opt, warmup, None)
    return opt, torch.optim.lr_scheduler.SequentialLR(opt, [ramp, decay], milestones=[warmup])


def _state(model: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters and of the buffers outside frozen modules (BatchNorm statistics)."""
    state = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    frozen = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if n not in names}
    for n, b in model.named_buffers():
        if n.rsplit(".", 1)[0] not in frozen:
            state[n] = b.detach().clone()
    return state


def _eval_before_forward(module: nn.Module, args) -> None:
    module.eval()


def freeze_batchnorm(model: nn.Module) -> int:
    """Run every BatchNorm layer of ``model`` in eval mode (running statistics used, not updated) from now on,
    whatever later ``train()`` calls do (Lightning switches modes around validation): a forward pre-hook puts
    the layer in eval mode before each forward. The affine weights keep training. Returns how many layers."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in layers:
        if not getattr(m, "_diffssl_frozen", False):
            m.register_forward_pre_hook(_eval_before_forward)
            m._diffssl_frozen = True
            m.eval()
    return len(layers)


def train_head(
    model: nn.Module,
    train: Rows,
    val: Rows | None = None,
    cfg: HeadTraining | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    desc: str = "head",
    runtime: Runtime | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters (only those with ``requires_grad``) with cross-entropy on
    ``train``; keep the epoch with the best ``val`` accuracy. Returns the cost and the validation accuracy.
    Runs on ``runtime`` (default: the command's; see :func:`~diffssl_plugin.supervised.fit`), or alone on
    ``device`` if that names another kind of device; the model stays on the device it trained on."""
    cfg = cfg or HeadTraining()
    named = trainable_parameters(model)
    if not named:
        raise InputError(f"{type(model).__name__} has no trainable parameters")
    names = {n for n, _ in named}
    n = len(train)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = n // batch  # drop the last partial batch (BatchNorm in DifFeed's feedback needs > 1)
    opt, sched = make_optimizer([p for _, p in named], cfg, steps_per_epoch)
    validate = (lambda m, dev: accuracy(m, val, cfg.batch_size * 2, dev, cfg.amp)) if val is not None else None
    # every rank takes one step per global batch, so the step count tells the epoch
    freeze_at = None if cfg.freeze_bn_epoch is None else cfg.freeze_bn_epoch * steps_per_epoch
    steps = itertools.count()

    def loss(m: nn.Module, batch) -> torch.Tensor:
        if next(steps) == freeze_at:
            freeze_batchnorm(m)
        return F.cross_entropy(m(batch[0]).float(), batch[1])

    result = fit(
        model,
        shuffled_batches(n, batch, torch.Generator().manual_seed(cfg.seed)),
        lambda idx: (train.get(idx), train.labels[idx]),
        loss,
        opt,
        sched,
        epochs=cfg.epochs,
        validate=validate,
        validate_every=cfg.eval_every,
        snapshot=lambda m: _state(m, names),
        amp=cfg.amp,
        desc=desc,
        progress=progress,
        device=device,
        runtime=runtime,
    )
    history = [
        {"epoch": h["epoch"], "loss": h["loss"], **({"val_acc": h["val"]} if "val" in h else {})}
        for h in result.history
    ]
    return TrainResult(
        val_acc=result.best_score,
        best_epoch=result.best_epoch,
        train_seconds=result.train_seconds,
        images_seen=result.rows_seen,
        trainable_params=sum(p.numel() for _, p in named),
        param_names=sorted(names),
        history=history,
        config=asdict(cfg),
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    data: Rows,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
) -> torch.Tensor:
    """Predicted classes for every row of ``data`` (eval mode), on ``device`` (default: the model's), in batches of
    ``batch_size`` rows (default: the device's :func:`~diffssl_plugin.runtime.inference_batch_size`)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batch_size = inference_batch_size(device, batch_size)
    model.eval()
    preds = []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        with mixed_precision(device, enabled=amp), cpu_math_attention(device):
            preds.append(model(_to(data.get(idx), device)).argmax(1).cpu())
    return torch.cat(preds)


def accuracy(
    model: nn.Module,
    data: Rows,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (torchmetrics' micro-averaged multiclass accuracy)."""
    preds = predict(model, data, batch_size, device, amp)
    num_classes = int(max(preds.max(), data.labels.max())) + 1
    return float(multiclass_accuracy(preds, data.labels.to(preds.device), num_classes, average="micro"))


# ---------------------------------------------------------------------------------------------- memory
def peak_memory_mb(device: str | torch.device = "cpu") -> float:
    """Peak memory so far: CUDA's peak allocation on a GPU, else the process's peak resident set (RSS)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return peak / 1024 if os.uname().sysname != "Darwin" else peak / 2**20
