"""The harness: any backbone in, records out.

``evaluate(model, ...)`` extracts frozen features once (cached), sweeps block × timestep (× pooling) for
diffusion backbones with a linear probe scored on the validation split, keeps the best setting, and reports
its linear-probe and kNN (k = 20, 200; T = 0.1) test accuracies as records. Backbones without ``extract``
have one readout: their pooled output. The sweep's validation accuracies are records too, and a heatmap PNG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from ..data import load_split
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
    final_cs: Sequence[float] = DEFAULT_CS
    knn_ks: Sequence[int] = (20, 200)
    knn_t: float = 0.1
    batch_size: int = 256
    seed: int = 0
    data_root: str | None = None
    extra: dict = field(default_factory=dict)

    def readouts(self, model: nn.Module) -> list[Readout]:
        if not hasattr(model, "extract"):
            return [OUTPUT]
        blocks = [b for b in (self.blocks or model.block_names) if b in model.block_names] or [model.block]
        return [Readout(t, b, p) for t in self.timesteps for b in blocks for p in self.pools]


def load_eval_splits(config: EvalConfig):
    """Balanced train/val subsets and the test split, all fixed by ``config.seed``."""
    train = load_split(config.dataset, "train", root=config.data_root)
    val = load_split(config.dataset, "val", root=config.data_root)
    test = load_split(config.dataset, "test", root=config.data_root)
    return (train.balanced_subset(total=config.train_images, seed=config.seed),
            val.balanced_subset(total=config.val_images, seed=config.seed),
            test.balanced_subset(total=config.test_images, seed=config.seed))


def evaluate(model: nn.Module, method: str, backbone_name: str, config: EvalConfig | None = None,
             budget: dict | None = None, checkpoint_hash: str | None = None,
             cache_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
             device: str = "cpu", progress: bool = True) -> list[dict]:
    """Run the frozen-feature protocols on ``model`` and return the records (sweep, linear, kNN)."""
    config = config or EvalConfig()
    model_hash = model_fingerprint(model)
    checkpoint_hash = checkpoint_hash or model_hash
    train, val, test = load_eval_splits(config)
    readouts = config.readouts(model)
    kw = dict(readouts=readouts, batch_size=config.batch_size, cache_dir=cache_dir, model_hash=model_hash,
              device=device, progress=progress)
    f_train, f_val, f_test = (extract_features(model, d, **kw) for d in (train, val, test))
    common = dict(method=method, backbone=backbone_name, dataset=config.dataset, checkpoint_hash=checkpoint_hash,
                  budget=budget, seed=config.seed, eval_config=asdict(config),
                  images={"train": len(train), "val": len(val), "test": len(test)})
    records = []
    sweep: dict[Readout, float] = {}
    if len(readouts) > 1:
        for r in readouts:
            res = linear_probe(f_train[r], train.labels, f_val[r], val.labels, cs=config.sweep_cs, seed=config.seed)
            sweep[r] = res.val_acc
            records.append(make_record(split="val", protocol={"name": "sweep_linear", **res.params},
                                       metric="top1", value=res.val_acc, readout=asdict(r), **common))
        best = max(readouts, key=lambda r: (sweep[r], -readouts.index(r)))
        if out_dir is not None:
            plot_sweep(sweep, Path(out_dir) / f"sweep_{backbone_name}.png", title=f"{method}: val linear acc")
    else:
        best = readouts[0]
    lin = linear_probe(f_train[best], train.labels, f_val[best], val.labels, f_test[best], test.labels,
                       cs=config.final_cs, seed=config.seed)
    records.append(make_record(split="test", protocol={"name": "linear", **lin.params}, metric="top1",
                               value=lin.test_acc, readout=asdict(best), val_acc=lin.val_acc, **common))
    for k in config.knn_ks:
        res = knn_probe(f_train[best], train.labels, f_val[best], val.labels, f_test[best], test.labels,
                        k=k, t=config.knn_t, num_classes=train.num_classes)
        records.append(make_record(split="test", protocol={"name": f"knn{k}", **res.params}, metric="top1",
                                   value=res.test_acc, readout=asdict(best), val_acc=res.val_acc, **common))
    return records


def plot_sweep(accuracies: dict[Readout, float], path: Path, title: str = "") -> Path:
    """Heatmap of validation accuracy: rows are blocks, columns timesteps, one panel per pooling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..io import atomic_path

    pools = sorted({r.pool for r in accuracies})
    blocks = list(dict.fromkeys(r.block for r in accuracies))
    timesteps = sorted({r.timestep for r in accuracies})
    fig, axes = plt.subplots(1, len(pools), figsize=(1.2 + 1.3 * len(timesteps) * len(pools), 0.5 * len(blocks) + 1.5),
                             squeeze=False)
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
