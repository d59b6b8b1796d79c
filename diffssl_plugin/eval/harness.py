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
from .probes import DEFAULT_CS, knn_probe, linear_probe
from .records import make_record


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
    batch_size: int = 256
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
    _splits: tuple | None = field(default=None, repr=False)
    _hash: str | None = field(default=None, repr=False)

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
        """Cached frozen features of ``data`` at ``readouts`` (see :func:`extract_features`)."""
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
                "precision": self.runtime.lightning_precision,
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


@register_protocol("linear")
def linear_and_knn(ctx: EvalContext) -> list[dict]:
    """Block × timestep (× pool) sweep by validation linear accuracy, then linear probe and kNN on test."""
    config = ctx.config
    train, val, test = ctx.splits()
    readouts = config.readouts(ctx.model)
    records = []
    swept: dict[int, dict[Readout, torch.Tensor]] = {}  # features the sweep computed, by id of their image set
    if len(readouts) > 1:
        s_train = train.balanced_subset(total=config.sweep_train_images, seed=config.seed)
        s_val = val.balanced_subset(total=config.sweep_val_images, seed=config.seed)
        s_f_train, s_f_val = (ctx.features(d, readouts) for d in (s_train, s_val))
        swept = {id(s_train): s_f_train, id(s_val): s_f_val}
        sweep: dict[Readout, float] = {}
        for r in readouts:
            res = ctx.once(
                linear_probe,
                s_f_train[r],
                s_train.labels,
                s_f_val[r],
                s_val.labels,
                cs=config.sweep_cs,
                seed=config.seed,
                device=ctx.device,
            )
            sweep[r] = res.val_acc
            records.append(
                ctx.record(split="val", protocol={"name": "sweep_linear", **res.params}, value=res.val_acc, readout=r)
            )
        ctx.best_readout = max(readouts, key=lambda r: (sweep[r], -readouts.index(r)))
        if ctx.writes_files:
            plot_sweep(
                sweep,
                Path(ctx.out_dir) / f"sweep_{ctx.backbone_name}.png",
                title=f"{ctx.method}: validation linear accuracy",
            )
    else:
        ctx.best_readout = readouts[0]
    best = ctx.best_readout
    # a sweep over the whole subsets already holds their features at the chosen readout (even without a cache)
    f_train, f_val, f_test = (swept[id(d)] if id(d) in swept else ctx.features(d, [best]) for d in (train, val, test))
    lin = ctx.once(
        linear_probe,
        f_train[best],
        train.labels,
        f_val[best],
        val.labels,
        f_test[best],
        test.labels,
        cs=config.final_cs,
        seed=config.seed,
        device=ctx.device,
    )
    records.append(
        ctx.record(split="test", protocol={"name": "linear", **lin.params}, value=lin.test_acc, val_acc=lin.val_acc)
    )
    for k in config.knn_ks:
        res = ctx.once(
            knn_probe,
            f_train[best],
            train.labels,
            f_val[best],
            val.labels,
            f_test[best],
            test.labels,
            k=k,
            t=config.knn_t,
            num_classes=train.num_classes,
            device=ctx.device,
        )
        records.append(
            ctx.record(
                split="test", protocol={"name": f"knn{k}", **res.params}, value=res.test_acc, val_acc=res.val_acc
            )
        )
    return records


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


def plot_sweep(accuracies: dict[Readout, float], path: Path, title: str = "") -> Path:
    """Heatmap of validation accuracy: rows are blocks, columns timesteps, one panel per pooling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..io import atomic_path

    output = accuracies.get(OUTPUT)
    if output is not None:  # the pooled output has no block or timestep: named in the title, not a cell
        title = f"{title}\n(pooled output: {100 * output:.1f})"
        accuracies = {r: a for r, a in accuracies.items() if r != OUTPUT}
    pools = sorted({r.pool for r in accuracies})
    blocks = list(dict.fromkeys(r.block for r in accuracies))
    timesteps = sorted({r.timestep for r in accuracies})
    fig, axes = plt.subplots(
        1, len(pools), figsize=(1.2 + 1.3 * len(timesteps) * len(pools), 0.5 * len(blocks) + 1.5), squeeze=False
    )
    for ax, pool in zip(axes[0], pools):
        grid = np.full((len(blocks), len(timesteps)), np.nan)
        for r, acc in accuracies.items():
            if r.pool == pool:
                grid[blocks.index(r.block), timesteps.index(r.timestep)] = 100 * acc
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(timesteps)), [str(t) for t in timesteps])
        ax.set_yticks(range(len(blocks)), blocks)
        ax.set_xlabel("timestep (0-indexed)")
        ax.set_title(f"pool={pool}")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
