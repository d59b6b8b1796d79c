"""Why a backbone's kNN score is low while its linear probe is not: the geometry of its frozen features.

The harness's kNN is lightly's weighted cosine kNN on the raw features (the InstDisc protocol; no centring), and
its linear probe standardises the features first. Rows that all point one way (a large shared offset, small
per-image variation) have cosines that differ by less than float32 resolves: the harness computes them in
float64 (``eval/probes.py``), and this script shows what float32, centring or standardising would give. On
Fashion-MNIST, for an export or a registered model:

* ``cos_to_mean``: mean (and minimum) cosine between each training row and the mean training row;
* ``row_norm_rel_std``: standard deviation of the rows' norms over their mean;
* kNN top-1 on the test subset with the training rows as the bank: ``knn_raw`` (the harness's protocol, float64
  cosines), ``knn_raw_float32`` (the same in float32, as the harness computed it before), centred on the
  training mean, and standardised with the training statistics (the probe's normalisation);
* ``linear``: the harness's linear probe on the same rows (the main job's C grid, C chosen on a validation
  subset, ``--val-images``).

``--precision`` sets what the features are extracted in (``auto``: as the harness does on this machine; ``fp32``;
``bf16``: bf16 autocast even where the CPU only emulates it, slow), so the cost of reading a backbone in bf16 can
be measured: run it twice and compare ``linear`` and the kNN columns.

    python benchmarks/feature_geometry.py --checkpoint runs/bench/mdsm/export --out runs/feature_geometry.json
    python benchmarks/feature_geometry.py --checkpoint runs/bench/mdsm/export --precision bf16 --out bf16.json
    python benchmarks/feature_geometry.py --model raw_pixels

Measured on the MDSM export of the learning-curve run (10 CPU-minutes, 876 steps, 512-d pooled output; 3,000
train / 1,000 test images, k = 20): cos_to_mean 1.0000, row norms 1165 ± 0.16; kNN float32 16.6% (chance 10%),
float64 65.8%, centred 64.9%, standardised 67.2%. The other learners' exports of that run (pooled output): cosine
to the mean 0.72–0.995, the same kNN in float32 and float64, and centring moved it by at most 2.4 points.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import diffssl_plugin  # noqa: F401  (registers the backbones)
from diffssl_plugin.data import load_split
from diffssl_plugin.eval.features import OUTPUT, Readout, extract_features
from diffssl_plugin.eval.probes import knn_accuracy, linear_probe
from diffssl_plugin.loading import load_backbone
from diffssl_plugin.presets import PRESETS
from diffssl_plugin.runtime import Runtime

#: ``--precision`` → the :class:`Runtime` precision the features are extracted at
PRECISIONS = {"auto": "auto", "fp32": "32-true", "bf16": "bf16-mixed"}


def geometry(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor, k: int) -> dict:
    """Shared-direction statistics of ``train`` and kNN-``k`` accuracy on raw, centred and standardised features."""
    train, test = train.float().flatten(1), test.float().flatten(1)
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    cos = torch.nn.functional.cosine_similarity(train, mean[None], dim=1)
    norms = train.norm(dim=1)
    return {
        "dims": train.shape[1],
        "cos_to_mean": float(cos.mean()),
        "cos_to_mean_min": float(cos.min()),
        "row_norm_mean": float(norms.mean()),
        "row_norm_rel_std": float(norms.std() / norms.mean().clamp_min(1e-12)),
        "knn_raw": knn_accuracy(train, train_y, test, test_y, k=k),
        "knn_raw_float32": knn_accuracy(train, train_y, test, test_y, k=k, dtype=torch.float32),
        "knn_centred": knn_accuracy(train - mean, train_y, test - mean, test_y, k=k),
        "knn_standardised": knn_accuracy((train - mean) / std, train_y, (test - mean) / std, test_y, k=k),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="an export folder (diffssl pretrain/bench writes one per learner)")
    source.add_argument("--model", help="a registered timm name (random weights)")
    p.add_argument("--timestep", type=int, default=None, help="diffusion readout: timestep (with --block)")
    p.add_argument("--block", default=None, help="diffusion readout: block (default: the pooled output)")
    p.add_argument("--pool", default="avg2x2", help="diffusion readout: pooling")
    p.add_argument("--train-images", type=int, default=3000)
    p.add_argument("--val-images", type=int, default=1000, help="validation subset the linear probe's C is chosen on")
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="auto", help="what features are extracted in")
    p.add_argument("--out", default="runs/feature_geometry.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = load_backbone(checkpoint=args.checkpoint, model=args.model).eval()
    readout = OUTPUT if args.block is None else Readout(args.timestep or 0, args.block, args.pool)
    train = load_split("fashion_mnist", "train").balanced_subset(total=args.train_images, seed=0)
    val = load_split("fashion_mnist", "val").balanced_subset(total=args.val_images, seed=0)
    test = load_split("fashion_mnist", "test").balanced_subset(total=args.test_images, seed=0)
    runtime = Runtime(accelerator="cpu", precision=PRECISIONS[args.precision])
    f_train, f_val, f_test = (
        extract_features(model, d, [readout], device="cpu", progress=False, runtime=runtime)[readout]
        for d in (train, val, test)
    )
    cs = PRESETS["default"].eval.final_cs  # the main job's C grid
    probe = linear_probe(f_train, train.labels, f_val, val.labels, f_test, test.labels, cs=cs)
    result = {
        "source": args.checkpoint or args.model,
        "readout": readout.label(),
        "precision": runtime.precision_of(model),
        "train_images": len(train),
        "val_images": len(val),
        "test_images": len(test),
        "k": args.k,
        **geometry(f_train, train.labels, f_test, test.labels, args.k),
        "linear": probe.test_acc,
        "linear_C": probe.params["C"],
    }
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
