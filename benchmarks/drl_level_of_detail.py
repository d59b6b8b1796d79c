"""DRL's level-of-detail claim: the distribution of noise levels decides what the code holds.

The paper (Mittal/Abstreiter et al., §"level of detail", MNIST, 2-D codes): with t uniform (σ log-uniform, small
noise weighted) the code holds fine detail (z1 ≈ stroke width, class only weakly); with σ uniform (large noise
weighted) the code holds the class. Here the same encoder (same init, same batches, same number of steps) is
trained under both samplers on Fashion-MNIST, and its (EMA, static) code is measured two ways:

* **class**: linear-probe accuracy of the code (C chosen on the validation split, scored on test), and kNN-20;
* **fine detail**: how much of the *within-class* variation of a pixel attribute the code predicts: the ink mass
  (mean pixel intensity) minus its class mean, predicted from the code by kNN regression (k = 20) on test, as R².
  Subtracting the class mean makes the class itself worthless for this prediction. The ink *brightness* (mean
  intensity of the inked pixels) and the *edge energy* (mean |x − 3×3 blur|) are reported the same way.

It also reports the denoising gain of the true code over a shuffled one at a few σ (relative DSM loss drop), and
draws the 2-D test codes coloured by class (PCA to 2-D if the code is wider).

Prints the four headline figures (class accuracy and detail R², for both samplers), writes JSON and a PNG.
Uncontended CPU cost: about 2 × ``--minutes`` of training plus ~1 minute of evaluation (default 6 min per sampler,
so under 15 minutes); ``--quick`` is a 1.5-minute-per-sampler check with smaller evaluation sets. The second
sampler always runs exactly as many steps as the first did, so both get the same compute even on a shared CPU.

    python benchmarks/drl_level_of_detail.py [--quick] [--minutes 6] [--max-steps 3000] [--out runs/drl_lod]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

SAMPLERS = ("uniform_t", "uniform_sigma")


def train_drl(
    sampler: str,
    data,
    steps: int | None,
    minutes: float,
    max_steps: int,
    batch_size: int,
    seed: int,
    method_kwargs: dict,
    log_every: int = 50,
) -> tuple[object, dict]:
    """Train a DRL learner under ``sampler`` for ``steps`` steps, or, if ``steps`` is None, until ``minutes`` run
    out or ``max_steps`` are done; the batches and the init are the same for every sampler (fixed by ``seed``)."""
    from diffssl_plugin.methods.base import StepBatches
    from diffssl_plugin.methods.drl import DRL

    torch.manual_seed(seed)
    model = DRL(batch_size_per_device=batch_size, sampler=sampler, seed=seed, **method_kwargs).train()
    opt_cfg = model.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    batches = StepBatches(data.images, data.labels, batch_size, seed=seed)
    start, step, losses = time.perf_counter(), 0, []
    limit = steps if steps is not None else max_steps
    while step < limit and (steps is not None or time.perf_counter() - start < 60 * minutes):
        images, _ = batches[step]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.training_loss(images, torch.Generator().manual_seed(seed * 1_000_003 + step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), model.gradient_clip_val)
        opt.step()
        sched.step()
        model.after_optimizer_step()  # the encoder's EMA
        losses.append(loss.item())
        step += 1
        if step % log_every == 0:
            print(
                f"  [{sampler}] step {step}  loss {sum(losses[-log_every:]) / log_every:.4f}  "
                f"{step * batch_size / (time.perf_counter() - start):.0f} img/s",
                flush=True,
            )
    wall = time.perf_counter() - start
    return model.eval(), {
        "steps": step,
        "wall_seconds": round(wall, 1),
        "images_per_s": round(step * batch_size / wall, 1),
        "final_loss_mean_last_50": sum(losses[-50:]) / max(1, len(losses[-50:])),
    }


@torch.no_grad()
def codes(model, images_uint8: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    backbone = model.feature_backbone.eval()  # the EMA encoder: the representation
    return torch.cat(
        [backbone(images_uint8[i : i + batch].float() / 127.5 - 1.0) for i in range(0, len(images_uint8), batch)]
    ).float()


def pixel_attributes(images_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image pixel statistics: ink mass (mean intensity in [0, 1]; MNIST's stroke width shows up here), ink
    brightness (mean intensity of the pixels > 0.1) and edge energy (mean |x − its 3×3 box blur|: texture and
    sharp edges, the finest detail)."""
    x = images_uint8.float() / 255.0
    flat = x.flatten(1)
    inked = flat > 0.1
    blur = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return {
        "ink_mass": flat.mean(1),
        "ink_brightness": (flat * inked).sum(1) / inked.sum(1).clamp_min(1),
        "edge_energy": (x - blur).abs().flatten(1).mean(1),
    }


def within_class_r2(train_z, train_y, train_attr, test_z, test_y, test_attr, k: int = 20) -> float:
    """R² on test of predicting (attribute − its class mean) from the code by kNN regression (Euclidean, on
    codes standardised with train statistics). 0 means the code knows nothing beyond the class."""
    classes = int(train_y.max()) + 1
    means = torch.zeros(classes).index_add_(0, train_y, train_attr) / torch.bincount(train_y, minlength=classes)
    r_train, r_test = train_attr - means[train_y], test_attr - means[test_y]
    mu, sd = train_z.mean(0), train_z.std(0).clamp_min(1e-8)
    a, b = (train_z - mu) / sd, (test_z - mu) / sd
    pred = torch.cat(
        [
            r_train[torch.cdist(b[i : i + 2000], a).topk(k, largest=False).indices].mean(1)
            for i in range(0, len(b), 2000)
        ]
    )
    return float(1 - (r_test - pred).pow(2).sum() / (r_test - r_test.mean()).pow(2).sum())


@torch.no_grad()
def denoising_gain(model, images_uint8: torch.Tensor, sigmas=(0.05, 0.5, 5.0), seed: int = 0) -> dict[str, float]:
    """Relative DSM loss drop from the true code to a shuffled one (codes permuted across images), at fixed σ."""
    from diffssl_plugin.diffusion.ve import noise_sampler, ve_dsm_loss

    x0 = images_uint8.float() / 127.5 - 1.0
    out = {}
    for sigma in sigmas:
        sampler = noise_sampler("uniform_t", sigma_range=(sigma * 0.999, sigma * 1.001))
        perm = torch.randperm(len(x0), generator=torch.Generator().manual_seed(seed))
        losses = {}
        for name, order in (("true", None), ("shuffled", perm)):

            def score_fn(x_t, s, t, order=order):
                z, _ = model.encoder(x0, t)
                return model.score(x_t, s, z if order is None else z[order])

            losses[name] = float(ve_dsm_loss(score_fn, x0, sampler, torch.Generator().manual_seed(seed + 1)))
        out[f"sigma={sigma:g}"] = (losses["shuffled"] - losses["true"]) / losses["shuffled"]
    return out


def plot_codes(results: dict, path: Path, class_names, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffssl_plugin.io import atomic_path

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.8), squeeze=False)
    for ax, (sampler, r) in zip(axes[0], results.items()):
        z, y = r["z2d"], r["labels"]
        sc = ax.scatter(z[:, 0], z[:, 1], c=y, cmap="tab10", s=3, alpha=0.6, vmin=-0.5, vmax=9.5)
        ax.set_title(
            f"{sampler}: linear {100 * r['class_linear_acc']:.1f}%, ink R² {r['detail_ink_mass_r2']:.2f}", fontsize=10
        )
        ax.set_xlabel("z1" if r["code_dim"] == 2 else "PC1")
        ax.set_ylabel("z2" if r["code_dim"] == 2 else "PC2")
    cbar = fig.colorbar(sc, ax=axes[0].tolist(), ticks=range(10), fraction=0.03)
    cbar.ax.set_yticklabels(class_names, fontsize=7)
    fig.suptitle(f"DRL codes of {dataset} test images, by noise sampler")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--code-dim", type=int, default=2)
    p.add_argument("--unet", default="fmnist_tiny", help="score-net preset (backbones.drl.SCORE_NET_PRESETS)")
    p.add_argument("--minutes", type=float, default=6.0, help="training wall-clock of the first sampler")
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--l1", type=float, default=0.0, help="L1 penalty on z (the paper's 2-D regulariser)")
    p.add_argument("--probe-train", type=int, default=10000)
    p.add_argument("--probe-val", type=int, default=2000)
    p.add_argument("--probe-test", type=int, default=None, help="test images (default: all)")
    p.add_argument("--quick", action="store_true", help="1.5 min per sampler, 5k/1k/5k probe images")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/drl_level_of_detail")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.probe_train, args.probe_val, args.probe_test = 1.5, 5000, 1000, 5000
    if args.threads:
        torch.set_num_threads(args.threads)

    import diffssl_plugin  # noqa: F401
    from diffssl_plugin.data import load_split
    from diffssl_plugin.eval.probes import knn_probe, linear_probe
    from diffssl_plugin.eval.records import environment
    from diffssl_plugin.io import write_json

    started = time.perf_counter()
    out = Path(args.out)
    pretrain_data = load_split(args.dataset, "trainval")
    train = load_split(args.dataset, "train").balanced_subset(total=args.probe_train, seed=args.seed)
    val = load_split(args.dataset, "val").balanced_subset(total=args.probe_val, seed=args.seed)
    test = load_split(args.dataset, "test").balanced_subset(total=args.probe_test, seed=args.seed)
    attrs = {name: pixel_attributes(d.images) for name, d in (("train", train), ("test", test))}
    method_kwargs = {
        "code_dim": args.code_dim,
        "time_dependent": False,
        "unet_config": args.unet,
        "lr": args.lr,
        "l1_weight": args.l1,
        "in_chans": pretrain_data.channels,
    }

    steps, results = None, {}
    for sampler in SAMPLERS:
        print(f"training DRL (code {args.code_dim}-d) with sampler {sampler!r} ...", flush=True)
        model, info = train_drl(
            sampler, pretrain_data, steps, args.minutes, args.max_steps, args.batch_size, args.seed, method_kwargs
        )
        steps = info["steps"] if steps is None else steps
        z_tr, z_va, z_te = codes(model, train.images), codes(model, val.images), codes(model, test.images)
        lin = linear_probe(z_tr, train.labels, z_va, val.labels, z_te, test.labels, seed=args.seed)
        knn = knn_probe(z_tr, train.labels, z_va, val.labels, z_te, test.labels, k=20)
        detail = {
            f"detail_{a}_r2": within_class_r2(
                z_tr, train.labels, attrs["train"][a], z_te, test.labels, attrs["test"][a]
            )
            for a in ("ink_mass", "ink_brightness", "edge_energy")
        }
        z2 = (
            z_te
            if args.code_dim == 2
            else (z_te - z_te.mean(0)) @ torch.linalg.svd(z_te - z_te.mean(0), full_matrices=False).Vh[:2].T
        )
        results[sampler] = {
            "train": info,
            "class_linear_acc": lin.test_acc,
            "class_linear_val_acc": lin.val_acc,
            "class_knn20_acc": knn.test_acc,
            **detail,
            "denoising_gain_true_vs_shuffled_code": denoising_gain(model, test.images[:512]),
            "code_dim": args.code_dim,
            "z2d": z2,
            "labels": test.labels,
        }
        print(
            f"  [{sampler}] class: linear {100 * lin.test_acc:.1f}%  kNN-20 {100 * knn.test_acc:.1f}%   "
            f"detail: ink-mass R² {detail['detail_ink_mass_r2']:.3f}  "
            f"brightness R² {detail['detail_ink_brightness_r2']:.3f}  edge-energy R² "
            f"{detail['detail_edge_energy_r2']:.3f}",
            flush=True,
        )
        gains = results[sampler]["denoising_gain_true_vs_shuffled_code"]
        print(
            "  denoising gain of the true code over a shuffled one: "
            + "  ".join(f"{k} {100 * v:.2f}%" for k, v in gains.items()),
            flush=True,
        )

    plot_codes(results, out / "drl_level_of_detail_codes.png", train.class_names, args.dataset)
    t, s = results["uniform_t"], results["uniform_sigma"]
    claim_class = s["class_linear_acc"] > t["class_linear_acc"]
    claim_detail = t["detail_ink_mass_r2"] > s["detail_ink_mass_r2"]
    print("\nDRL level of detail (" + f"{args.dataset}, {args.code_dim}-d static code, {steps} steps each)")
    print(f"{'sampler':<15}{'class linear acc':>18}{'fine detail (ink R²)':>22}")
    for name, r in results.items():
        print(f"{name:<15}{100 * r['class_linear_acc']:>17.1f}%{r['detail_ink_mass_r2']:>22.3f}")
    print(
        f"paper's claim — uniform σ holds more class: {'yes' if claim_class else 'no'}; "
        f"uniform t holds more fine detail: {'yes' if claim_detail else 'no'}"
    )
    record = {
        "benchmark": "drl_level_of_detail",
        "dataset": args.dataset,
        "args": vars(args),
        "steps_per_sampler": steps,
        "claim_uniform_sigma_more_class": claim_class,
        "claim_uniform_t_more_detail": claim_detail,
        "results": {k: {kk: vv for kk, vv in v.items() if kk not in ("z2d", "labels")} for k, v in results.items()},
        "wall_seconds": round(time.perf_counter() - started, 1),
        **environment(),
    }
    write_json(out / "drl_level_of_detail.json", record)
    print(
        f"wrote {out / 'drl_level_of_detail.json'} and {out / 'drl_level_of_detail_codes.png'} "
        f"({record['wall_seconds']:.0f} s)"
    )
    return record


if __name__ == "__main__":
    main()
