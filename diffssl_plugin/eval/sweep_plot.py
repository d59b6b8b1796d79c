"""The sweep's heatmap: validation linear accuracy per block × timestep (× pooling)."""

from __future__ import annotations

from pathlib import Path

from .features import OUTPUT, Readout


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
