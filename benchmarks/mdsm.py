"""MDSM on Fashion-MNIST: what one energy network does after a CPU-minutes budget (issue 7, item 6).

Trains MDSM through the package's ``pretrain`` (Lightning, the registered ``mdsm`` learner; its energy network
always computes in fp32, see ``EnergyResNet._trunk``), loads the exported backbone back through timm, then
measures

* **denoising**: PSNR of one-step denoising ``x̃ − σ0²∇E(x̃)`` against the noisy input at σ ∈ {0.1, 0.3, 0.5};
* **inpainting**: mean squared error on the masked region (lower half; centre square) after masked annealed
  Langevin, against filling the region with the training set's per-pixel mean (the "masked-mean" baseline) and
  with the mean of the image's own visible pixels;
* **outlier detection**: energy-score AUROC of Fashion-MNIST test against MNIST-5k, uniform noise and vertically
  flipped Fashion-MNIST (:mod:`diffssl_plugin.eval.ood`);
* **training throughput**: images/s and training FLOPs per image (double back-propagation included),

writes them to ``mdsm.json`` and PNG grids of samples, inpaintings (original, mask, masked input, result) and
noisy/denoised pairs. Sampling and inpainting run MDSM's "exp" temperature schedule shrunk to ``--langevin-steps``
steps (the paper's is 2700 steps of size 0.02) with the step size grown to keep the paper's total Langevin time
``n·ε²`` (ε = 0.02·√(2700/n); ``--step-size`` overrides), inside the package's autocast, which the energy
network opts out of: sampling, denoising and energies are float32 (energies are large numbers whose differences
matter).

    python benchmarks/mdsm.py                      # 4 min training + ≈ 5 min measuring (1 shared core)
    python benchmarks/mdsm.py --budget 60s --quick # a fast check of the whole path
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import timm
import torch

from diffssl_plugin.data import load_split
from diffssl_plugin.diffusion import SIGMA0, denoise, inpaint, sample, temperature_schedule
from diffssl_plugin.diffusion.energy import perturb
from diffssl_plugin.diffusion.sampling import save_grid
from diffssl_plugin.eval.ood import ood_aurocs
from diffssl_plugin.eval.records import environment
from diffssl_plugin.io import write_json
from diffssl_plugin.methods.training import Budget, pretrain
from diffssl_plugin.runtime import current, mixed_precision


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over images of 10·log10(1 / MSE), images in [0, 1]."""
    mse = (x - ref).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())


def denoising(model, clean: torch.Tensor, sigmas=(0.1, 0.3, 0.5), seed: int = 0, show: int = 8):
    """PSNR before and after one denoising step, per σ, and the images for the grid."""
    results, rows = {}, []
    for k, sigma in enumerate(sigmas):
        noisy = perturb(clean, torch.full((len(clean),), sigma), torch.Generator().manual_seed(seed + k))
        out = denoise(model.energy, noisy)
        results[str(sigma)] = {
            "psnr_noisy": psnr(noisy, clean),
            "psnr_denoised": psnr(out, clean),
            "psnr_noisy_clipped": psnr(noisy.clamp(0, 1), clean),
            "psnr_denoised_clipped": psnr(out.clamp(0, 1), clean),
        }
        r = results[str(sigma)]
        r["gain_db"] = r["psnr_denoised"] - r["psnr_noisy"]
        r["gain_over_clipping_db"] = r["psnr_denoised_clipped"] - r["psnr_noisy_clipped"]
        rows += [clean[:show], noisy[:show], out[:show]]
    return results, torch.cat(rows)


def masks(size: int = 28) -> dict[str, torch.Tensor]:
    """True = pixel to fill."""
    lower = torch.zeros(1, 1, size, size, dtype=torch.bool)
    lower[..., size // 2 :, :] = True
    centre = torch.zeros(1, 1, size, size, dtype=torch.bool)
    c = size // 2
    centre[..., c - 6 : c + 6, c - 6 : c + 6] = True
    return {"lower_half": lower, "centre_12x12": centre}


def inpainting(
    model,
    images: torch.Tensor,
    train_mean: torch.Tensor,
    temperatures: torch.Tensor,
    step_size: float,
    seed: int = 0,
    show: int = 8,
):
    """Masked-region MSE of MDSM inpainting and of the two mean baselines, per mask, and the grid images."""
    results, rows = {}, []
    for k, (name, mask) in enumerate(masks(images.shape[-1]).items()):
        m = mask.expand_as(images)
        with mixed_precision("cpu"):
            out = inpaint(
                model.energy, images, mask, temperatures, step_size, generator=torch.Generator().manual_seed(seed + k)
            )
        context = images.masked_fill(m, 0).flatten(1).sum(1) / (~m).flatten(1).sum(1)
        fills = {
            "mdsm": out.clamp(0, 1),
            "mdsm_unclipped": out,
            "baseline_train_mean": torch.where(m, train_mean.expand_as(images), images),
            "baseline_context_mean": torch.where(m, context.view(-1, 1, 1, 1).expand_as(images), images),
        }
        results[name] = {f"mse_{key}": float((v - images)[m].pow(2).mean()) for key, v in fills.items()}
        results[name]["masked_pixels"] = int(mask.sum())
        shown = images[:show]
        rows += [shown, mask.expand_as(shown).float(), shown.masked_fill(mask, 0.5), out[:show]]
    return results, torch.cat(rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="4min", help="MDSM training budget, e.g. 4min, 90s, 300steps")
    p.add_argument("--out", default="runs/mdsm_bench")
    p.add_argument("--width", type=int, default=16, help="energy ResNet width (the paper's is 64)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the learner's)")
    p.add_argument("--langevin-steps", type=int, default=270, help="annealed Langevin steps (paper: 2700)")
    p.add_argument(
        "--step-size",
        type=float,
        default=None,
        help="Langevin step ε (default 0.02·√(2700/steps): the paper's total Langevin time)",
    )
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--inpaint-images", type=int, default=32, help="images per mask")
    p.add_argument("--denoise-images", type=int, default=1000)
    p.add_argument("--ood-images", type=int, default=None, help="Fashion-MNIST test images (default: all 10k)")
    p.add_argument("--quick", action="store_true", help="small measurement sets (for a fast check)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.langevin_steps, args.samples, args.inpaint_images = min(args.langevin_steps, 60), 16, 16
        args.denoise_images, args.ood_images = 200, args.ood_images or 1000
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    started = time.perf_counter()

    method_kwargs = {"width": args.width} | ({"lr": args.lr} if args.lr else {})
    result = pretrain(
        "mdsm",
        "fashion_mnist",
        Budget.parse(args.budget),
        out / "pretrain",
        batch_size=128,
        method_kwargs=method_kwargs,
        progress=False,
        resume=not args.no_resume,
        seed=args.seed,
    )
    model = timm.create_model(f"local-dir:{out / 'pretrain' / 'export' / 'backbone'}", pretrained=True).eval()
    trained = time.perf_counter()
    report: dict = {
        "budget": str(Budget.parse(args.budget)),
        "method_kwargs": method_kwargs,
        "sigma0": SIGMA0,
        "training": {
            "steps": result.steps,
            "images_seen": result.images_seen,
            "wall_seconds": result.wall_seconds,
            "images_per_second": result.images_seen / max(result.wall_seconds, 1e-9),
            "flops_per_image": result.flops_per_image,
            "final_loss": result.final_loss,
            "final_normalised_loss": (result.final_loss or 0.0) * SIGMA0**4,
        },
    }

    test = load_split("fashion_mnist", "test")
    timings = {}
    t = time.perf_counter()
    report["denoising"], grid = denoising(model, test.floats()[: args.denoise_images], seed=args.seed)
    save_grid(grid, out / "denoising_pairs.png")
    timings["denoising"] = time.perf_counter() - t

    t = time.perf_counter()
    temps = temperature_schedule("exp", steps=args.langevin_steps)
    step_size = args.step_size or 0.02 * math.sqrt(2700 / args.langevin_steps)
    train_mean = load_split("fashion_mnist", "trainval").floats().mean(0, keepdim=True)
    picked = test.balanced_subset(total=args.inpaint_images, seed=args.seed).floats()
    report["inpainting"], grid = inpainting(model, picked, train_mean, temps, step_size, seed=args.seed)
    save_grid(grid, out / "inpainting.png")
    timings["inpainting"] = time.perf_counter() - t

    t = time.perf_counter()
    with mixed_precision("cpu"):
        # sampled at the padded 32×32 size (the official order: pad, then noise), the 28×28 centre kept
        side, pad = model.sample_size, (model.sample_size - 28) // 2
        samples = sample(
            model.energy,
            (args.samples, 1, side, side),
            temps,
            step_size,
            generator=torch.Generator().manual_seed(args.seed),
        )[..., pad : pad + 28, pad : pad + 28]
    save_grid(samples, out / "samples.png")
    report["samples"] = {
        "count": args.samples,
        "mean": float(samples.mean()),
        "std": float(samples.std()),
        "fraction_in_0_1": float(((samples >= 0) & (samples <= 1)).float().mean()),
    }
    timings["sampling"] = time.perf_counter() - t

    t = time.perf_counter()
    inliers = test.balanced_subset(total=args.ood_images, seed=args.seed) if args.ood_images else test
    report["ood_auroc"] = ood_aurocs(model, inliers, seed=args.seed)
    timings["ood"] = time.perf_counter() - t

    report["langevin"] = {
        "schedule": "exp",
        "steps": args.langevin_steps,
        "step_size": step_size,
        "precision": current().precision_of(model),  # 32-true: the energy network opts out of autocast
    }
    report["timings_seconds"] = {
        "training_and_export": trained - started,
        **timings,
        "total": time.perf_counter() - started,
    }
    report["quick"] = args.quick
    report.update(environment())
    write_json(out / "mdsm.json", report)
    print(
        json.dumps(
            {k: report[k] for k in ("training", "denoising", "inpainting", "ood_auroc", "timings_seconds")}, indent=1
        )
    )
    return report


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
