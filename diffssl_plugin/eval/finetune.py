"""The ``finetune`` protocol: every backbone weight and a new linear head trained with labels, one recipe for
every learner. lightly's ImageNet table shows why it belongs beside linear and kNN: MAE scores 46.0 linear
but 81.3 fine-tuned.

Recipe (all of it written into each record; override any field with ``EvalConfig.extra["finetune"]``):

* a deep copy of the backbone (the caller's model is never changed), every parameter trainable, read at the
  readout the ``linear`` sweep chose (if it ran first) or at the backbone's own pooled output;
* head: ``BatchNorm1d(affine=False)`` then ``Linear`` (MAE's linear-probe head), the normalisation so that
  one learning rate fits features of any scale (raw pixels, U-Net maps, ViT tokens);
* LP-FT (Kumar et al., ICLR 2022): the head starts as the linear probe on the frozen features of the whole
  evaluation train subset (the normalisation set to their mean and variance, the weights to the
  L2-regularised logistic regression, C chosen on validation from the ``linear`` protocol's grid), so
  fine-tuning starts from the ``linear`` column's classifier and sends no random gradients into the
  pretrained weights (with a few CPU epochs, a zero-started head scored far below the probe). When the
  ``linear`` protocol ran first, its fitted probe *is* the start (not fit a second time: at 3,072-d that fit
  is ~20 s on 2 cores), so epoch 0 of the validation curve is the ``linear`` record's validation accuracy;
* AdamW (weight decay 0.05), backbone lr 5e-5, head lr 1e-3, linear warm-up over the first 10% of the steps
  then cosine to zero, batch 128 (full batches only), bf16 autocast where the device computes bf16 in hardware
  (else fp32); normalisation statistics and dropout frozen (eval mode), so the features the probe was fit on
  only change through the weights; no augmentation
  (in two epochs there is little to regularise). These choices come from checks on 2-minute SimCLR and MAE
  backbones (2,000 fine-tuning images): flips (raw pixels, MAE), batch-norm statistics in training mode,
  and backbone lr 1e-4 (MAE) or 3e-5 (SimCLR) each ended further below the probe. On the CPU, attention
  layers use PyTorch's plain-matmul kernel (faster there for short token sequences);
* ``epochs`` (default 2) over the evaluation train subset (10k class-balanced images by default), or over a
  class-balanced part of it (``train_images``); the validation accuracy is measured before fine-tuning
  (epoch 0: the probe) and after each epoch, and the best epoch's weights are scored once on the test split.

For a backbone without parameters (raw pixels) this is a linear classifier on its features. Training runs
through :func:`diffssl_plugin.supervised.fit` (the command's devices; under DDP several processes take the
steps one process takes).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from ..data import ImageSet
from ..data.flip import flip_coins, hflip
from ..errors import InputError
from ..heads.training import Rows, accuracy, image_rows
from ..optim import warmup_cosine
from ..runtime import Runtime, precision_name
from ..supervised import fit, resolve_runtime, shuffled_batches
from .features import OUTPUT, Readout, extract_features, normalise, pooled_output
from .harness import EvalContext, register_protocol
from .probes import DEFAULT_CS, ProbeResult, linear_probe


@dataclass(frozen=True)
class FinetuneRecipe:
    """The fine-tuning recipe; one for every backbone."""

    epochs: int = 2
    batch_size: int = 128
    lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.05
    probe_cs: tuple[float, ...] | None = None  # C grid of the probe start (None: the linear protocol's)
    warmup_fraction: float = 0.1
    train_images: int | None = None  # images fine-tuned on (None: all of the evaluation train subset)
    hflip: bool = False  # random horizontal flips while fine-tuning
    amp: bool = True
    select_best: bool = True  # score the best validation epoch (else the last)
    train_mode: bool = False  # batch-norm statistics and dropout in training mode (else frozen, eval mode)
    seed: int = 0

    @classmethod
    def from_dict(cls, overrides: dict | None) -> FinetuneRecipe:
        """The default recipe with ``overrides``; unknown names raise :class:`InputError`."""
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(overrides or {}) - names)
        if unknown:
            raise InputError(f"unknown finetune settings {unknown}; valid: {sorted(names)}")
        return cls(**(overrides or {}))


@dataclass
class FinetuneResult:
    """Accuracies of the chosen epoch, the validation curve, and the fine-tuned copy."""

    val_acc: float
    test_acc: float
    best_epoch: int
    val_curve: list[float]
    train_images: int
    model: nn.Module | None = field(default=None, repr=False)


def read_features(backbone: nn.Module, readout: Readout, x: torch.Tensor) -> torch.Tensor:
    """(B, D) features of ``backbone`` at ``readout``, with gradients: ``extract`` for a swept readout, else
    the backbone's pooled output."""
    r = readout
    if r.block is not None and hasattr(backbone, "extract"):
        return backbone.extract(x, [r.timestep], [r.block], pool=r.pool)[(r.timestep, r.block)].flatten(1)
    return pooled_output(backbone, x)


class Classifier(nn.Module):
    """A backbone read at ``readout``, then ``BatchNorm1d(affine=False)`` and ``Linear``."""

    def __init__(self, backbone: nn.Module, readout: Readout, num_features: int, num_classes: int):
        super().__init__()
        self.backbone, self.readout = backbone, readout
        self.norm = nn.BatchNorm1d(num_features, affine=False)
        self.head = nn.Linear(num_features, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(read_features(self.backbone, self.readout, x).float()))

    @torch.no_grad()
    def start_from(self, probe: ProbeResult) -> None:
        """LP step of LP-FT: the normalisation and head become ``probe``'s classifier (a :func:`linear_probe`
        result on this backbone's frozen features at this readout), so the start's logits are the probe's.
        The probe divides by the train features' std, ``BatchNorm1d`` by ``sqrt(var + eps)``: the weights are
        scaled by ``sqrt(std² + eps) / std`` to make up for the eps."""
        (w, b), (mean, std) = probe.weights, probe.standardisation
        dev = self.head.weight.device
        mean, var = mean.to(dev), std.to(dev).pow(2)
        self.norm.running_mean.copy_(mean)
        self.norm.running_var.copy_(var)
        scale = (var + self.norm.eps).sqrt() / std.to(dev)
        self.head.weight.copy_((w.to(dev) * scale[:, None]).t())
        self.head.bias.copy_(b.to(dev))


def head_classes(train: ImageSet) -> int:
    """Outputs of the fine-tuning head: the dataset's classes, or more if a label lies beyond them."""
    return max(train.num_classes, int(train.labels.max()) + 1)


def image_set_rows(model: Classifier, data: ImageSet) -> Rows:
    """``data``'s images normalised for ``model``'s backbone, as rows to score (:func:`~..heads.training.accuracy`)."""
    return image_rows(data.images, data.labels, lambda x: normalise(model.backbone, x))


def finetune(
    backbone: nn.Module,
    train: ImageSet,
    val: ImageSet,
    test: ImageSet,
    readout: Readout = OUTPUT,
    recipe: FinetuneRecipe = FinetuneRecipe(),
    device: str | torch.device | None = None,
    progress: bool = False,
    frozen: tuple[torch.Tensor, torch.Tensor] | None = None,
    runtime: Runtime | None = None,
    frozen_test: torch.Tensor | None = None,
    probe: ProbeResult | None = None,
) -> FinetuneResult:
    """Start a deep copy of ``backbone`` plus a linear head from the linear probe on ``train``, fine-tune it
    on ``train`` (or ``recipe.train_images`` of it), choose the epoch on ``val``, score it on ``test``.
    ``backbone`` itself is left untouched. ``frozen``: the backbone's features of ``train`` and ``val`` at
    ``readout``, if already computed (else they are extracted here); ``frozen_test``: the same of ``test``, so
    that when validation keeps the start (epoch 0: the probe, the backbone unchanged) the test split is scored
    on them instead of running the backbone again; ``probe``: the linear probe already fit on ``frozen`` with
    C chosen on ``val`` (the ``linear`` protocol's), which the head then starts from instead of fitting it
    again (else it is fit here with ``recipe.probe_cs``). Trains with
    :func:`~diffssl_plugin.supervised.fit` on ``runtime`` (default: the command's), or alone on ``device`` if
    that names another kind of device; validation and test run on every rank."""
    rt = resolve_runtime(device, runtime)
    dev = rt.device
    net = copy.deepcopy(backbone).to(dev)
    for p in net.parameters():
        p.requires_grad_(True)
    num_classes = head_classes(train)
    if probe is None:
        if frozen is None:
            frozen = tuple(
                extract_features(net, d, [readout], device=dev, amp=recipe.amp, progress=False)[readout]
                for d in (train, val)
            )
        cs = recipe.probe_cs or DEFAULT_CS
        f_train, f_val = frozen
        probe = linear_probe(f_train, train.labels, f_val, val.labels, cs=cs, device=dev, num_classes=num_classes)
    model = Classifier(net, readout, probe.weights[0].shape[0], num_classes).to(dev)
    model.start_from(probe)
    probe_acc = probe.val_acc
    if recipe.train_images:
        train = train.balanced_subset(total=recipe.train_images, seed=recipe.seed)

    groups = [
        {"params": list(model.backbone.parameters()), "lr": recipe.lr},
        {"params": list(model.head.parameters()), "lr": recipe.head_lr},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=recipe.weight_decay)
    steps_per_epoch = max(1, len(train) // recipe.batch_size)  # full batches (batch norm in the head)
    total = recipe.epochs * steps_per_epoch
    sched = warmup_cosine(opt, round(recipe.warmup_fraction * total), total)
    gen = torch.Generator().manual_seed(recipe.seed)
    order = shuffled_batches(len(train), recipe.batch_size, gen)

    def plan() -> list[torch.Tensor]:
        if not recipe.hflip:
            return order()
        # a coin per image, drawn after the epoch's order, batch by batch: rows are (index, flip)
        return [torch.stack([b, flip_coins(len(b), gen).long()], 1) for b in order()]

    def load(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = rows[:, 0] if recipe.hflip else rows
        x = train.images[idx].float().div_(255.0)
        if recipe.hflip:
            x = hflip(x, coins=rows[:, 1].bool())
        return normalise(model.backbone, x), train.labels[idx]

    result = fit(
        model,
        plan,
        load,
        lambda m, batch: nn.functional.cross_entropy(m(batch[0]).float(), batch[1]),
        opt,
        sched,
        epochs=recipe.epochs,
        validate=lambda m, d: accuracy(m, image_set_rows(m, val), device=d, amp=recipe.amp),
        start_score=probe_acc,
        select_best=recipe.select_best,
        train_mode=recipe.train_mode,
        amp=recipe.amp,
        unused_parameters=True,
        desc="finetune",
        progress=progress,
        runtime=rt,
    )
    if result.best_epoch == 0 and frozen_test is not None:  # the start: the probe on the frozen features
        test_acc = head_accuracy(model, frozen_test, test.labels)
    else:
        test_acc = accuracy(model, image_set_rows(model, test), amp=recipe.amp)
    curve = [probe_acc] + [h["val"] for h in result.history]
    return FinetuneResult(result.best_score, test_acc, result.best_epoch, curve, len(train), model)


@torch.no_grad()
def head_accuracy(model: Classifier, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model``'s normalisation and head on backbone features already computed."""
    model.eval()
    dev = model.head.weight.device
    preds = model.head(model.norm(features.to(dev).float())).argmax(1).cpu()
    return float((preds == labels).float().mean())


@register_protocol("finetune")
def finetune_protocol(ctx: EvalContext) -> list[dict]:
    """All weights and a new linear head trained with labels (recipe in :class:`FinetuneRecipe`)."""
    recipe = FinetuneRecipe.from_dict({"seed": ctx.config.seed, **ctx.config.extra.get("finetune", {})})
    recipe = replace(recipe, probe_cs=tuple(recipe.probe_cs or ctx.config.final_cs))
    train, val, test = ctx.splits()
    readout = ctx.readout()
    # held by the linear protocol
    f_train, f_val, f_test = (ctx.features(d, [readout])[readout] for d in (train, val, test))
    start = _linear_column_probe(ctx, readout, recipe.probe_cs, head_classes(train))
    res = finetune(
        ctx.model,
        train,
        val,
        test,
        readout,
        recipe,
        device=ctx.device,
        progress=ctx.progress,
        frozen=(f_train, f_val),
        frozen_test=f_test,
        probe=start,
    )
    protocol = {
        "name": "finetune",
        "optimizer": "AdamW",
        "schedule": "warmup_cosine",
        "head": "batchnorm1d(affine=False)+linear",
        "head_init": "linear probe (LP-FT)" + (": the linear column's classifier" if start is not None else ""),
        "selection": "best validation epoch (0: the probe)" if recipe.select_best else "last epoch",
        "augment": "hflip" if recipe.hflip else "none",
        "precision": precision_name(ctx.device, recipe.amp),
        **asdict(recipe),
        "train_images": res.train_images,
        "best_epoch": res.best_epoch,
        "val_curve": res.val_curve,
    }
    return [ctx.record(split="test", protocol=protocol, value=res.test_acc, val_acc=res.val_acc, readout=readout)]


def _linear_column_probe(
    ctx: EvalContext, readout: Readout, cs: tuple[float, ...], num_classes: int
) -> ProbeResult | None:
    """The ``linear`` protocol's final probe if it ran on these features with this C grid (the same fit the
    LP-FT start would make: same features, labels, validation split and selection), else None."""
    probe = ctx.final_probe
    if probe is None or ctx.best_readout != readout:
        return None
    if tuple(probe.params.get("C_grid", ())) != tuple(sorted(cs)) or probe.weights[0].shape[1] != num_classes:
        return None
    return probe
