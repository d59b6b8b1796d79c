"""DRL's level-of-detail experiment as the paper ran it (Mittal/Abstreiter et al., §4.1; ``papers.md`` §1.4).

The claim: a 2-D DRL code trained on MNIST with an L1 penalty on the code holds stroke width (z1) and only weakly
the class (z2) when t is uniform (σ log-uniform on [0.01, 50]: small noise weighted), and holds the class when σ
is uniform on [0.01, 50] (large noise weighted). Here, for each seed, one static 2-D encoder per sampler is
trained from the same init on the same batches for the same number of steps, on ``mnist5k`` (4,000 training
digits; no horizontal flips), with the L1 penalty on z. The EMA encoder's code of the held-out digits is then
measured two ways, and the mean ± std over seeds is printed:

* **class**: a linear probe on the 2-D code (L2 strength chosen on the validation split, scored on test), and
  kNN-20 accuracy;
* **stroke width**: ``w = 2 · ink area / ink perimeter`` of the binarised digit (pixel > 0.5). A ribbon of length
  L and width w has area ≈ wL and boundary ≈ 2L, so 2A/P ≈ w whatever the digit's length or shape; it is the
  area / skeleton-length measure (Morpho-MNIST's thickness) with half the boundary standing in for the skeleton
  (no skeletoniser is installed). Ink mass alone would not do: it grows with the stroke's *length*, which depends
  on the class (an 8 has more ink than a 1 at the same width). Reported as the test R² of predicting w from the
  code by least squares (is there a width *axis*, as the paper's z1?), and as the within-class kNN-20 R² (w
  minus its class mean, so knowing the class is worth nothing).

Pictures (first seed): the 2-D codes of the test digits coloured by class, one panel per sampler
(``codes.png``), and for each sampler a grid of digits decoded over the 2-D code (z1 along columns, z2 along
rows, spanning the 2nd–98th percentile of the test codes) by the VE reverse SDE conditioned on z, every cell from
the same noise (``samples_<sampler>.png``).

Choices the paper leaves open: the L1 weight (``--l1 0.01``, in the learner's pixel-summed units; at ``--l1 1``
the 250-step run shrank the codes to |z| ≈ 0.002, so the score net barely used them; at 0.01 they are of order 1);
the score net (``fmnist_tiny``, attention-free, chosen so that 3 seeds × 2 samplers fit ~20–30 CPU minutes); batch
64, AdamW lr 1e-3. Step count: ``--steps`` (default 400, 6.4 passes over the 4,000 digits) is set by the CPU
budget, not by convergence (~0.4 s a step single-threaded on the 2-core host, ~0.9 s under load): the loss has not
flattened by then (uniform t: 0.16 at step 125, 0.11 at step 400), as the record's loss curve (means over 25-step
windows) shows; read the numbers as an early-training snapshot. ``--threads 1`` avoids the thread-sync stalls of
a 2-thread run on an oversubscribed host.

    python benchmarks/drl_level_of_detail.py --threads 1 [--steps 400] [--l1 0.01] [--seeds 0 1 2] [--out runs/drl_lod]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

SAMPLERS = ("uniform_t", "uniform_sigma")


def train_drl(
    sampler: str, images: torch.Tensor, steps: int, batch_size: int, seed: int, method_kwargs: dict, log_every: int
) -> tuple[object, dict]:
    """Train a DRL learner under ``sampler`` for ``steps`` steps; init, batches and noise depend on ``seed`` only,
    so the two samplers of one seed see the same init and the same images in the same order."""
    from diffssl_plugin.methods.base import StepBatches
    from diffssl_plugin.methods.drl import DRL
    from diffssl_plugin.runtime import mixed_precision

    torch.manual_seed(seed)
    model = DRL(batch_size_per_device=batch_size, sampler=sampler, seed=seed, **method_kwargs).train()
    opt_cfg = model.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    batches = StepBatches(images, torch.zeros(len(images), dtype=torch.long), batch_size, seed=seed)
    start, curve, window = time.perf_counter(), [], []
    for step in range(steps):
        x, _ = batches[step]
        with mixed_precision("cpu"):
            loss = model.training_loss(x, torch.Generator().manual_seed(seed * 1_000_003 + step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), model.gradient_clip_val)
        opt.step()
        sched.step()
        model.after_optimizer_step()  # the encoder's EMA
        window.append(loss.item())
        if len(window) == log_every or step == steps - 1:
            curve.append(round(sum(window) / len(window), 5))
            print(f"  [{sampler} seed {seed}] step {step + 1}  loss {curve[-1]:.4f}", flush=True)
            window = []
    wall = time.perf_counter() - start
    return model.eval(), {"steps": steps, "wall_seconds": round(wall, 1), "loss_curve": curve}


@torch.no_grad()
def codes(model, images_uint8: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """The EMA encoder's static codes of uint8 images."""
    backbone = model.feature_backbone.eval()  # the EMA encoder: the representation
    return torch.cat(
        [backbone(images_uint8[i : i + batch].float() / 127.5 - 1.0) for i in range(0, len(images_uint8), batch)]
    ).float()


def stroke_width(images_uint8: torch.Tensor, threshold: int = 128) -> torch.Tensor:
    """Per-digit stroke width ``2 · ink area / ink perimeter`` in pixels (see the module docstring). The
    perimeter counts the 4-neighbour edges between an ink pixel and background (the frame counts as background)."""
    ink = torch.nn.functional.pad((images_uint8[:, 0] >= threshold).float(), (1, 1, 1, 1))
    perimeter = (ink[:, 1:] != ink[:, :-1]).sum((1, 2)) + (ink[:, :, 1:] != ink[:, :, :-1]).sum((1, 2))
    return 2 * ink.sum((1, 2)) / perimeter.clamp_min(1)


def linear_r2(train_z, train_w, test_z, test_w) -> float:
    """Test R² of a least-squares fit ``w ≈ a·z + b`` made on train."""
    design = torch.cat([train_z, torch.ones(len(train_z), 1)], 1).double()
    coef = torch.linalg.lstsq(design, train_w.double().unsqueeze(1)).solution
    pred = (torch.cat([test_z, torch.ones(len(test_z), 1)], 1).double() @ coef).squeeze(1)
    return float(1 - (test_w - pred).pow(2).sum() / (test_w - test_w.mean()).pow(2).sum())


def within_class_knn_r2(train_z, train_y, train_w, test_z, test_y, test_w, k: int = 20) -> float:
    """Test R² of predicting (w − its class mean) from the code by kNN regression (codes standardised with train
    statistics). 0: the code knows nothing about w beyond the class."""
    classes = int(train_y.max()) + 1
    means = torch.zeros(classes).index_add_(0, train_y, train_w) / torch.bincount(train_y, minlength=classes)
    r_train, r_test = train_w - means[train_y], test_w - means[test_y]
    mu, sd = train_z.mean(0), train_z.std(0).clamp_min(1e-8)
    nearest = torch.cdist((test_z - mu) / sd, (train_z - mu) / sd).topk(k, largest=False).indices
    pred = r_train[nearest].mean(1)
    return float(1 - (r_test - pred).pow(2).sum() / (r_test - r_test.mean()).pow(2).sum())


def sample_grid(model, z_test: torch.Tensor, grid: int, steps: int, seed: int) -> torch.Tensor:
    """Digits decoded over a ``grid × grid`` lattice of 2-D codes (z1 along columns, z2 along rows, 2nd–98th
    percentile of the test codes) by the VE reverse SDE conditioned on the code, all from the same noise. [0, 1]."""
    from diffssl_plugin.diffusion.ve import ve_reverse_sde_sample

    lo, hi = torch.quantile(z_test, 0.02, dim=0), torch.quantile(z_test, 0.98, dim=0)
    z1, z2 = (torch.linspace(float(lo[d]), float(hi[d]), grid) for d in (0, 1))
    zz = torch.stack([z1.repeat(grid), z2.flip(0).repeat_interleave(grid)], 1)  # row-major, z2 grows upwards
    model.eval()

    def score_fn(x_t, sigma, t):
        return model.score(x_t, sigma, zz)

    size = model.score_net.config.sample_size
    shape = (grid * grid, model.score_net.config.in_channels, size, size)
    x = ve_reverse_sde_sample(
        score_fn, shape, steps, model.noise.schedule, torch.Generator().manual_seed(seed), shared_noise=True
    )
    return ((x + 1) / 2).clamp(0, 1)


def plot_codes(per_sampler: dict, path: Path, title: str) -> None:
    """The 2-D test codes coloured by class, one panel per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffssl_plugin.io import atomic_path

    fig, axes = plt.subplots(1, len(per_sampler), figsize=(5.0 * len(per_sampler), 4.6), squeeze=False)
    for ax, (sampler, r) in zip(axes[0], per_sampler.items()):
        z, y = r["z_test"], r["y_test"]
        sc = ax.scatter(z[:, 0], z[:, 1], c=y, cmap="tab10", s=4, alpha=0.7, vmin=-0.5, vmax=9.5)
        ax.set_title(f"{sampler}: linear {100 * r['class_linear_acc']:.1f}%, width R² {r['width_r2']:.2f}", fontsize=9)
        ax.set_xlabel("z1")
        ax.set_ylabel("z2")
    fig.colorbar(sc, ax=axes[0].tolist(), ticks=range(10), fraction=0.03)
    fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


METRICS = {
    "class_linear_acc": ("class: linear probe acc", 100.0),
    "class_knn20_acc": ("class: kNN-20 acc", 100.0),
    "width_r2": ("stroke width: linear R²", 1.0),
    "width_within_class_knn_r2": ("stroke width: within-class kNN R²", 1.0),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--unet", default="fmnist_tiny", help="score-net preset (backbones.drl.SCORE_NET_PRESETS)")
    p.add_argument("--steps", type=int, default=400, help="training steps per (sampler, seed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--l1", type=float, default=0.01, help="L1 penalty on z (pixel-summed units; 1 collapses the code)")
    p.add_argument("--grid", type=int, default=8, help="the sample grid is grid × grid codes")
    p.add_argument("--sample-steps", type=int, default=200, help="reverse-SDE steps for the sample grid")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--max-images", type=int, default=None, help="cap every split (class-balanced; quick checks)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/drl_level_of_detail")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import diffssl_plugin  # noqa: F401
    from diffssl_plugin.data import DATASETS, load_split
    from diffssl_plugin.diffusion.sampling import save_grid
    from diffssl_plugin.eval.probes import knn_probe, linear_probe
    from diffssl_plugin.eval.records import environment
    from diffssl_plugin.io import write_json

    started, out = time.perf_counter(), Path(args.out)
    pretrain, train, val, test = (
        load_split(args.dataset, s).balanced_subset(total=args.max_images) for s in ("trainval", "train", "val", "test")
    )
    width = {name: stroke_width(d.images) for name, d in (("train", train), ("test", test))}
    method_kwargs = {
        "code_dim": 2,
        "time_dependent": False,
        "unet_config": args.unet,
        "lr": args.lr,
        "l1_weight": args.l1,
        "in_chans": pretrain.channels,
        "hflip": DATASETS[args.dataset].hflip,  # False for digits
    }

    runs: dict[str, list[dict]] = {s: [] for s in SAMPLERS}
    pictures: dict[str, dict] = {}
    for seed in args.seeds:
        for sampler in SAMPLERS:
            print(f"training DRL (2-d code, L1 {args.l1:g}) with {sampler!r}, seed {seed} ...", flush=True)
            model, info = train_drl(
                sampler, pretrain.images, args.steps, args.batch_size, seed, method_kwargs, args.log_every
            )
            z_tr, z_va, z_te = codes(model, train.images), codes(model, val.images), codes(model, test.images)
            lin = linear_probe(z_tr, train.labels, z_va, val.labels, z_te, test.labels, seed=seed)
            knn = knn_probe(z_tr, train.labels, z_va, val.labels, z_te, test.labels, k=20)
            r = {
                "seed": seed,
                "train": info,
                "class_linear_acc": lin.test_acc,
                "class_knn20_acc": knn.test_acc,
                "width_r2": linear_r2(z_tr, width["train"], z_te, width["test"]),
                "width_within_class_knn_r2": within_class_knn_r2(
                    z_tr, train.labels, width["train"], z_te, test.labels, width["test"]
                ),
                "code_abs_mean": z_te.abs().mean(0).tolist(),
            }
            runs[sampler].append(r)
            print(
                f"  [{sampler} seed {seed}] class: linear {100 * r['class_linear_acc']:.1f}%  kNN-20 "
                f"{100 * r['class_knn20_acc']:.1f}%   stroke width: linear R² {r['width_r2']:.3f}  "
                f"within-class kNN R² {r['width_within_class_knn_r2']:.3f}  ({info['wall_seconds']:.0f} s)",
                flush=True,
            )
            if seed == args.seeds[0]:
                pictures[sampler] = {**r, "z_test": z_te, "y_test": test.labels}
                grid = sample_grid(model, z_te, args.grid, args.sample_steps, seed)
                save_grid(grid, out / f"samples_{sampler}.png", nrow=args.grid)

    plot_codes(
        pictures,
        out / "codes.png",
        f"DRL 2-d codes of {args.dataset} test digits (seed {args.seeds[0]}, {args.steps} steps, L1 {args.l1:g})",
    )
    summary = {
        sampler: {m: dict(zip(("mean", "std"), mean_std([r[m] for r in rs]))) for m in METRICS}
        for sampler, rs in runs.items()
    }
    paired = {
        m: dict(
            zip(
                ("mean", "std"),
                mean_std([s[m] - t[m] for s, t in zip(runs["uniform_sigma"], runs["uniform_t"])]),
            )
        )
        for m in METRICS
    }
    print(f"\nDRL level of detail: {args.dataset}, 2-d code, L1 {args.l1:g}, {args.steps} steps, seeds {args.seeds}")
    print(f"{'':<36}{'uniform t':>18}{'uniform σ':>18}{'σ − t (paired)':>20}")
    for m, (label, scale) in METRICS.items():
        cells = [f"{scale * summary[s][m]['mean']:.3g} ± {scale * summary[s][m]['std']:.2g}" for s in SAMPLERS]
        diff = f"{scale * paired[m]['mean']:+.3g} ± {scale * paired[m]['std']:.2g}"
        print(f"{label:<36}{cells[0]:>18}{cells[1]:>18}{diff:>20}")
    record = {
        "benchmark": "drl_level_of_detail",
        "dataset": args.dataset,
        "args": vars(args),
        "summary": summary,
        "paired_sigma_minus_t": paired,
        "runs": runs,
        "wall_seconds": round(time.perf_counter() - started, 1),
        **environment(),
    }
    write_json(out / "drl_level_of_detail.json", record)
    print(f"wrote {out}/drl_level_of_detail.json, codes.png, samples_*.png ({record['wall_seconds']:.0f} s)")
    return record


if __name__ == "__main__":
    main()
