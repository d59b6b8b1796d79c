"""The harness: any backbone in, records out.

Protocols are functions ``fn(ctx: EvalContext) -> list[record]`` registered by name in :data:`PROTOCOLS`
(``@register_protocol("name")``); ``diffssl eval --protocol NAME`` and ``diffssl bench`` run them by name.
The base protocol ``linear`` extracts frozen features once (cached), sweeps block × timestep (× pooling) for
diffusion backbones with a linear probe scored on the validation split, keeps the best setting, and reports
its linear-probe and kNN (k = 20, 200; T = 0.1) test accuracies as records. Backbones without ``extract``
have one readout: their pooled output. The sweep's validation accuracies are records too, and a heatmap PNG.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from ..data import load_split
from ..errors import check_name
from ..runtime import Runtime, current
from .features import OUTPUT, Readout, extract_features, model_fingerprint
from .probes import DEFAULT_CS, ProbeResult, knn_probe, linear_probe
from .records import make_record
from .sweep_plot import plot_sweep


@dataclass
class EvalConfig:
    """Protocol settings; every field is written into each record."""

    dataset: str = "fashion_mnist"
    train_images: int | None = 10000  # class-balanced subset of the train split (None: all)
    val_images: int | None = 5000
    test_images: int | None = None  # None: the whole test split
    timesteps: Sequence[int] = (0, 10, 50)
    blocks: Sequence[str] | None = ("down2", "mid", "up0.0", "up0", "up1.0", "up1")
    pools: Sequence[str] = ("avg", "avg2x2")
    sweep_cs: Sequence[float] = (1e-2, 1e-1, 1.0)
    #: class-balanced parts of the train/val subsets the sweep scores readouts on (None: all of them); only the
    #: chosen readout is then extracted for the whole subsets and the test split
    sweep_train_images: int | None = None
    sweep_val_images: int | None = None
    final_cs: Sequence[float] = DEFAULT_CS
    knn_ks: Sequence[int] = (20, 200)
    knn_t: float = 0.1
    #: images per extraction forward (None: the device's, :func:`~diffssl_plugin.runtime.inference_batch_size`)
    batch_size: int | None = None
    seed: int = 0
    data_root: str | None = None
    extra: dict = field(default_factory=dict)

    def readouts(self, model: nn.Module) -> list[Readout]:
        """The sweep's readouts: this config's blocks × timesteps × pools where the model has those blocks;
        else the model's own ``sweep_grid`` (a dict with ``blocks`` and optionally ``timesteps``, ``pools``
        and ``output``: whether its pooled output competes too); else its ``block`` at this config's grid."""
        if not hasattr(model, "extract"):
            return [OUTPUT]
        blocks = [b for b in (self.blocks or model.block_names) if b in model.block_names]
        grid = getattr(model, "sweep_grid", None)
        if blocks or grid is None:
            return [Readout(t, b, p) for t in self.timesteps for b in blocks or [model.block] for p in self.pools]
        timesteps, pools = grid.get("timesteps", self.timesteps), grid.get("pools", self.pools)
        return ([OUTPUT] if grid.get("output") else []) + [
            Readout(t, b, p) for t in timesteps for b in grid["blocks"] for p in pools
        ]


def load_eval_splits(config: EvalConfig):
    """Balanced train/val subsets and the test split, all fixed by ``config.seed``."""
    train = load_split(config.dataset, "train", root=config.data_root)
    val = load_split(config.dataset, "val", root=config.data_root)
    test = load_split(config.dataset, "test", root=config.data_root)
    return (
        train.balanced_subset(total=config.train_images, seed=config.seed),
        val.balanced_subset(total=config.val_images, seed=config.seed),
        test.balanced_subset(total=config.test_images, seed=config.seed),
    )


T = TypeVar("T")


@dataclass
class EvalContext:
    """What a protocol needs: the model, the protocol settings, the evaluation splits, the feature cache, and
    a record factory that fills in every common field (method, backbone, hash, budget, config, versions)."""

    model: nn.Module
    method: str
    backbone_name: str
    config: EvalConfig
    budget: dict | None = None
    checkpoint_hash: str | None = None
    cache_dir: str | os.PathLike | None = None
    out_dir: str | os.PathLike | None = None
    device: str | None = None  # None: the runtime's device (``cuda:LOCAL_RANK`` on GPUs)
    progress: bool = True
    runtime: Runtime = field(default_factory=current)
    #: the readout the linear sweep chose on validation (other protocols reuse it); None until it ran
    best_readout: Readout | None = None
    #: the ``linear`` protocol's final probe at ``best_readout`` (its classifier: fine-tuning's LP-FT start)
    final_probe: ProbeResult | None = None
    _splits: tuple | None = field(default=None, repr=False)
    _hash: str | None = field(default=None, repr=False)
    #: features already extracted, by (dataset, split, readout): (source indices, rows); see :meth:`features`
    _memory: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.device = str(self.device or self.runtime.device)

    def once(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(*args, **kwargs)`` computed on rank 0 only and handed to every rank (probes, sklearn fits):
        work that is the same on every rank runs once."""
        result = fn(*args, **kwargs) if self.runtime.is_global_zero else None
        return self.runtime.broadcast(result)

    @property
    def writes_files(self) -> bool:
        """Whether this process writes pictures and other files into ``out_dir`` (rank 0 only)."""
        return self.out_dir is not None and self.runtime.is_global_zero

    @property
    def model_hash(self) -> str:
        if self._hash is None:
            self._hash = model_fingerprint(self.model)
        return self._hash

    def splits(self):
        """(train, val, test) :class:`ImageSet` of ``config.dataset``, loaded once."""
        if self._splits is None:
            self._splits = load_eval_splits(self.config)
        return self._splits

    def features(self, data, readouts: Sequence[Readout]) -> dict[Readout, torch.Tensor]:
        """Frozen features of ``data`` at ``readouts`` (see :func:`extract_features`), shared across protocols:
        rows this evaluation already holds for the same images (same dataset, split and source index, e.g. the
        sweep's subsets inside the final train/val subsets) are reused from memory, and only the other images
        are extracted (through the disk cache). Seeded extraction noise is drawn per source index, so an image's
        rows are the same in every subset that holds it."""
        readouts = list(dict.fromkeys(readouts))
        held = {r: self._held_rows(data, r) for r in readouts}
        missing = torch.zeros(len(data), dtype=torch.bool)
        for r in readouts:
            missing |= ~held[r][0] if held[r] is not None else True
        out: dict[Readout, torch.Tensor] = {}
        if bool(missing.any()):
            need = [r for r in readouts if held[r] is None or not bool(held[r][0].all())]
            part = data if bool(missing.all()) else data.take(missing.nonzero().flatten())
            fresh = self._extract(part, need)
            for r in need:
                if part is data:
                    out[r] = fresh[r]
                    continue
                rows = torch.empty((len(data), *fresh[r].shape[1:]), dtype=fresh[r].dtype)
                rows[missing] = fresh[r]
                found, known = held[r]
                rows[found & ~missing] = known[~missing[found]]
                out[r] = rows
        for r in readouts:
            if r not in out:
                out[r] = held[r][1]
            if data.indices is not None:
                key = (data.name, data.split, r)
                self._memory[key] = _merge(self._memory.get(key), data.indices, out[r])
        return out

    def _held_rows(self, data, readout: Readout) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mask of ``data``'s images held in memory at ``readout``, their rows in order) or None."""
        entry = self._memory.get((data.name, data.split, readout))
        if entry is None or data.indices is None:
            return None
        indices, rows = entry
        order = indices.argsort()
        pos = torch.searchsorted(indices[order], data.indices).clamp_max(len(indices) - 1)
        found = indices[order][pos] == data.indices
        if not bool(found.any()):
            return None
        return found, rows[order[pos[found]]]

    def keep_features(self, readouts: Sequence[Readout]) -> None:
        """Drop the features held in memory at every readout but ``readouts`` (e.g. after the sweep)."""
        self._memory = {k: v for k, v in self._memory.items() if k[2] in set(readouts)}

    def _extract(self, data, readouts: Sequence[Readout]) -> dict[Readout, torch.Tensor]:
        return extract_features(
            self.model,
            data,
            readouts,
            batch_size=self.config.batch_size,
            cache_dir=self.cache_dir,
            model_hash=self.model_hash,
            device=self.device,
            progress=self.progress,
            runtime=self.runtime,
        )

    def readout(self) -> Readout:
        """The readout protocols use: the sweep's choice if it ran, else the model's own output."""
        return self.best_readout or OUTPUT

    def record(
        self,
        *,
        split: str,
        protocol: dict,
        value: float,
        metric: str = "top1",
        readout: Readout | None = None,
        dataset: str | None = None,
        **extra,
    ) -> dict:
        train, val, test = self.splits()
        return make_record(
            method=self.method,
            backbone=self.backbone_name,
            dataset=dataset or self.config.dataset,
            split=split,
            protocol=protocol,
            metric=metric,
            value=value,
            checkpoint_hash=self.checkpoint_hash or self.model_hash,
            budget=self.budget,
            readout=asdict(readout or self.readout()),
            seed=self.config.seed,
            eval_config=asdict(self.config),
            images={"train": len(train), "val": len(val), "test": len(test)},
            runtime={
                "device": self.device,
                "world_size": self.runtime.world_size,
                "precision": self.runtime.precision_of(self.model),
            },
            **extra,
        )


Protocol = Callable[[EvalContext], list[dict]]
PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(name: str) -> Callable[[Protocol], Protocol]:
    """Decorator: make ``fn(ctx) -> records`` available as ``diffssl eval --protocol NAME`` and in the bench."""

    def add(fn: Protocol) -> Protocol:
        PROTOCOLS[name] = fn
        return fn

    return add


def _probe(ctx: EvalContext, probe: Callable, feats: Sequence[dict], sets: Sequence, readout: Readout, **kwargs):
    """``probe`` (:func:`linear_probe`, :func:`knn_probe`) on the ``readout`` rows of ``feats`` with the labels of
    the matching ``sets`` (train, val[, test]), on ``ctx.device``, computed once (rank 0) and broadcast."""
    args = [x for f, d in zip(feats, sets) for x in (f[readout], d.labels)]
    return ctx.once(probe, *args, device=ctx.device, **kwargs)


@register_protocol("linear")
def linear_and_knn(ctx: EvalContext) -> list[dict]:
    """Block × timestep (× pool) sweep by validation linear accuracy, then linear probe and kNN on test."""
    config = ctx.config
    train, val, test = ctx.splits()
    readouts = config.readouts(ctx.model)
    records = []
    if len(readouts) > 1:
        s_train = train.balanced_subset(total=config.sweep_train_images, seed=config.seed)
        s_val = val.balanced_subset(total=config.sweep_val_images, seed=config.seed)
        s_f_train, s_f_val = (ctx.features(d, readouts) for d in (s_train, s_val))
        sweep: dict[Readout, float] = {}
        for r in readouts:
            res = _probe(
                ctx, linear_probe, (s_f_train, s_f_val), (s_train, s_val), r, cs=config.sweep_cs, seed=config.seed
            )
            if not sweep or res.val_acc > sweep[ctx.best_readout]:  # the best on validation; the first wins ties
                # its probe is kept (only the best one's: bases are up to D × D) for the final probe to start from
                ctx.best_readout, sweep_best = r, res
            sweep[r] = res.val_acc
            records.append(
                ctx.record(split="val", protocol={"name": "sweep_linear", **res.params}, value=res.val_acc, readout=r)
            )
        del s_f_train, s_f_val
        ctx.keep_features([ctx.best_readout])  # the final subsets reuse the sweep's rows of the chosen readout
        if ctx.writes_files:
            plot_sweep(
                sweep,
                Path(ctx.out_dir) / f"sweep_{ctx.backbone_name}.png",
                title=f"{ctx.method}: validation linear accuracy",
            )
    else:
        ctx.best_readout, sweep_best = readouts[0], None
    best = ctx.best_readout
    # the sweep's images are parts of the final train/val subsets: only the others are extracted here
    feats = [ctx.features(d, [best]) for d in (train, val, test)]
    # the final probe starts from the sweep's at this readout (half of its images): a warm start, same objective
    lin = _probe(
        ctx, linear_probe, feats, (train, val, test), best, cs=config.final_cs, seed=config.seed, start=sweep_best
    )
    ctx.final_probe = lin
    records.append(
        ctx.record(split="test", protocol={"name": "linear", **lin.params}, value=lin.test_acc, val_acc=lin.val_acc)
    )
    for k in config.knn_ks:
        res = _probe(
            ctx, knn_probe, feats, (train, val, test), best, k=k, t=config.knn_t, num_classes=train.num_classes
        )
        records.append(
            ctx.record(
                split="test", protocol={"name": f"knn{k}", **res.params}, value=res.test_acc, val_acc=res.val_acc
            )
        )
    return records


def _merge(entry, indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A held (indices, rows) entry with ``rows`` of the images ``indices`` added (new images only)."""
    if entry is None:
        return indices, rows
    old_indices, old_rows = entry
    new = ~torch.isin(indices, old_indices)
    return torch.cat([old_indices, indices[new]]), torch.cat([old_rows, rows[new]])


def evaluate(
    model: nn.Module,
    method: str,
    backbone_name: str,
    config: EvalConfig | None = None,
    protocols: Sequence[str] = ("linear",),
    budget: dict | None = None,
    checkpoint_hash: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
    runtime: Runtime | None = None,
) -> list[dict]:
    """Run ``protocols`` (names in :data:`PROTOCOLS`) on ``model``, in order, and return their records.

    Hardware comes from ``runtime`` (default: :func:`diffssl_plugin.runtime.current`, which the CLI sets from
    ``--accelerator/--devices/--strategy/--num-nodes/--precision``); ``device`` overrides its device. Under
    several processes every rank calls this: extraction is sharded across ranks, training loops run under
    DDP, probes and pictures happen on rank 0, and every rank returns the same records (write them on
    rank 0 only).
    """
    for name in protocols:
        check_name("protocol", name, PROTOCOLS)
    ctx = EvalContext(
        model,
        method,
        backbone_name,
        config or EvalConfig(),
        budget,
        checkpoint_hash,
        cache_dir,
        out_dir,
        device,
        progress,
        runtime=runtime or current(),
    )
    records = []
    for name in protocols:
        records += PROTOCOLS[name](ctx)
    return records
