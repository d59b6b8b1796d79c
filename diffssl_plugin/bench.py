"""``diffssl bench``: the main job. Pretrain every benchmarked learner under one budget on one dataset,
evaluate each (and the raw-pixel floor) with the same harness, and write records, a leaderboard, sweep
heatmaps and a sample grid."""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import check_name
from .eval import EvalConfig, evaluate, write_leaderboard, write_records
from .io import file_sha256, write_json
from .loading import load_backbone
from .methods.training import Budget, budget_spent, pretrain
from .runtime import Runtime, current

ALL_LEARNERS = ("ddae", "simclr", "mae", "drl", "vdrl", "mdsm")
#: the default bench's protocols; the head protocols (attention, difformer, diffeed) cost several CPU-minutes
#: each per diffusion backbone, so they run in the "heads" preset (or `diffssl eval --protocol ...`)
ALL_PROTOCOLS = ("linear", "finetune", "semisup", "transfer", "segmentation", "segmentation_mlp", "ood")
HEAD_PROTOCOLS = ("attention", "difformer", "diffeed")


@dataclass
class BenchPreset:
    """Everything a bench run fixes: learners, the shared budget, batch, and the evaluation protocol."""

    methods: tuple[str, ...] = ALL_LEARNERS
    protocols: tuple[str, ...] = ALL_PROTOCOLS
    budget: Budget = Budget(minutes=2.5)  # noqa: RUF009 -- frozen, so one shared instance is safe
    batch_size: int = 128
    max_pretrain_images: int | None = None
    eval: EvalConfig = field(
        default_factory=lambda: EvalConfig(
            train_images=6000,
            val_images=2000,
            test_images=4000,
            # 2×2 pooling only: global average pooling lost to it at every block, timestep and budget we measured
            # (DDAE mid block: 79.2 vs 85.9 at 5 CPU-minutes), and each pool doubles the sweep's probes; t = 0 and
            # 10 only: t = 50 was never chosen at CPU budgets (small timesteps win: t = 0 ≥ 10 ≥ 30 ≥ 50), and
            # each timestep is one more U-Net pass over the sweep's images (`diffssl eval --timesteps` for more)
            pools=("avg2x2",),
            timesteps=(0, 10),
            sweep_train_images=3000,
            sweep_val_images=1500,
            final_cs=(1e-2, 1e-1, 1.0),
            extra=copy.deepcopy(_DEFAULT_EXTRA),
        )
    )
    sample_images: int = 64
    sample_steps: int = 50
    #: per-learner arguments (``pretrain(method_kwargs=...)``)
    method_kwargs: dict = field(default_factory=dict)
    #: per-learner global batch sizes where they differ from ``batch_size``
    method_batch_size: dict = field(default_factory=dict)
    #: learning-curve points: when set, each learner is one run stopped and evaluated at every point (curve.py)
    curve_points: tuple[Budget, ...] | None = None

    def batch_for(self, method: str) -> int:
        """The global pretraining batch of ``method`` in this preset."""
        return self.method_batch_size.get(method, self.batch_size)


#: the default bench's protocol settings: each protocol's CPU-scale version (the full-size defaults live in the
#: protocols). Semi-supervised subsets come from the linear protocol's cached 10k evaluation subset
#: ("eval_train"), and fine-tuning runs at 1% only; segmentation uses 100/50/100 scenes.
_DEFAULT_EXTRA = {
    "finetune": {"train_images": 1000, "epochs": 1},
    "semisup": {
        "pool": "eval_train",
        "ft_fractions": [0.01],
        "finetune": {"epochs": 1, "batch_size": 64},
        "ft_val_images": 500,
        "ft_test_images": 1000,
        "cs": [0.01, 0.1, 1.0],
    },
    "transfer": {"train_images": 1000, "val_images": 300, "test_images": 500},
    "segmentation": {"train_images": 100, "val_images": 50, "test_images": 100, "head_epochs": 10, "mlp_pixels": 10000},
}
_SMOKE_EXTRA = {
    "finetune": {"train_images": 200, "epochs": 1},
    "semisup": {
        "fractions": [0.01],
        "ft_fractions": [0.01],
        "seeds": [0, 1],
        "finetune": {"epochs": 1, "batch_size": 32},
        "ft_val_images": 100,
        "ft_test_images": 200,
        "cs": [0.1, 1.0],
    },
    "transfer": {"train_images": 200, "val_images": 100, "test_images": 200},
    "segmentation": {
        "train_images": 24,
        "val_images": 8,
        "test_images": 16,
        "head_epochs": 2,
        "mlp_pixels": 4000,
        "mlp_members": 3,
        "mlp_epochs": 1,
    },
}

PRESETS: dict[str, BenchPreset] = {
    # MDSM's representation is read from its last map 2×2-average-pooled (2048-d) instead of the flattened map
    # the energy head reads (8192-d): every probe on 8192-d features took about four times as long (a third
    # of the bench's evaluation time); the energy itself is unchanged
    # CPU recipes chosen on the validation split at this budget (`benchmarks/recipe_search.py`, table in the README):
    # SimCLR at batch 64, SGD 0.3, τ 0.2, crops of at least 20% of the image (lightly's CIFAR-10 recipe, SGD
    # 0.06 / τ 0.5 / 8% crops, is a 200-epoch one: 74.7% validation linear vs 85.8% at 2.5 CPU-minutes)
    "default": BenchPreset(
        method_kwargs={
            "mdsm": {"global_pool": "avg2x2"},
            "simclr": {"lr": 0.3, "temperature": 0.2, "min_scale": 0.2},
        },
        method_batch_size={"simclr": 64},
    ),
    # DDAE with GAP-linear beside the attention, DifFormer and DifFeed heads on the same checkpoint
    "heads": BenchPreset(
        methods=("ddae",),
        protocols=("linear", *HEAD_PROTOCOLS),
        budget=Budget(minutes=3),
        eval=EvalConfig(
            extra={"difformer": {"train_images": 5000, "val_images": 2000, "training_kwargs": {"epochs": 8}}}
        ),
    ),
    # the same code path in about a minute, for tests and quick checks
    "smoke": BenchPreset(
        budget=Budget(steps=15),
        batch_size=32,
        max_pretrain_images=1000,
        eval=EvalConfig(
            train_images=500,
            val_images=300,
            test_images=500,
            timesteps=(0, 10),
            blocks=("mid", "up0"),
            pools=("avg",),
            final_cs=(0.1, 1.0),
            extra=_SMOKE_EXTRA,
        ),
        sample_images=16,
        sample_steps=5,
    ),
}
# learning curves: the default's learners and settings, one run per learner evaluated (linear, kNN) at 1, 3
# and 10 minutes of training; --budget sets the last point and scales the others
PRESETS["curve"] = replace(
    copy.deepcopy(PRESETS["default"]),
    protocols=("linear",),
    budget=Budget(minutes=10),
    curve_points=(Budget(minutes=1), Budget(minutes=3), Budget(minutes=10)),
)


def run_bench(
    preset: str = "default",
    out_dir: str | os.PathLike = "runs/bench",
    dataset: str | None = None,
    budget: Budget | None = None,
    methods: tuple[str, ...] | None = None,
    data_root: str | None = None,
    progress: bool = True,
    resume: bool = True,
    runtime: Runtime | None = None,
) -> tuple[str, list[dict]]:
    """Run the benchmark and return (leaderboard Markdown, records).

    Hardware comes from ``runtime`` (default :func:`diffssl_plugin.runtime.current`). Under several
    processes every rank runs this: pretraining is DDP, extraction is sharded, and rank 0 alone writes
    records, leaderboard, pictures and samples, so the output is one set of records. A preset with
    ``curve_points`` (``curve``) hands over to :func:`diffssl_plugin.curve.run_curve` (``budget``: the last point)
    and returns its table instead of a leaderboard.
    """
    import timm

    from .diffusion.sampling import sample_images, save_grid
    from .methods import get_method

    cfg = PRESETS[check_name("bench preset", preset, PRESETS)]
    for method in methods or ():
        get_method(method)  # an unknown name fails here, listing the registered ones, before any work
    rt = (runtime or current()).launch()
    cfg = replace(cfg, budget=budget or cfg.budget, methods=methods or cfg.methods)
    eval_cfg = replace(cfg.eval, dataset=dataset or cfg.eval.dataset, data_root=data_root)
    out = Path(out_dir)
    if cfg.curve_points:  # learning curves: curve.py trains each learner once, evaluating it at every point
        from .curve import run_curve

        return run_curve(cfg, eval_cfg, out, budget, preset, data_root, progress, resume, rt)
    started = time.perf_counter()
    common = {
        "config": eval_cfg,
        "protocols": cfg.protocols,
        "cache_dir": out / "feature_cache",
        "out_dir": out,
        "progress": progress,
        "runtime": rt,
    }

    records: list[dict] = []

    def publish(new: list[dict]) -> None:
        """Append each learner's records and refresh the leaderboard as soon as they exist (rank 0 writes)."""
        records.extend(new)
        if rt.is_global_zero:
            write_records(out / "records.jsonl", new)
            write_leaderboard(records, out, dataset=eval_cfg.dataset)

    publish(
        evaluate(
            timm.create_model("raw_pixels", in_chans=_channels(eval_cfg), img_size=_size(eval_cfg)),
            "raw_pixels",
            "raw_pixels",
            **common,
        )
    )
    for method in cfg.methods:
        result = pretrain(
            method,
            eval_cfg.dataset,
            cfg.budget,
            out / method,
            batch_size=cfg.batch_for(method),
            data_root=data_root,
            runtime=rt,
            progress=progress,
            resume=resume,
            max_images=cfg.max_pretrain_images,
            method_kwargs=cfg.method_kwargs.get(method),
        )
        export_dir = Path(result.out_dir) / "export"
        backbone = load_backbone(checkpoint=export_dir)
        publish(
            evaluate(
                backbone,
                method,
                backbone.pretrained_cfg.get("architecture", method),
                budget=budget_spent(result),
                checkpoint_hash=file_sha256(export_dir / "backbone")[:16],
                **common,
            )
        )
        if (export_dir / "diffusers").is_dir() and rt.is_global_zero:
            from diffusers import DDPMPipeline

            pipe = DDPMPipeline.from_pretrained(str(export_dir / "diffusers"), local_files_only=True)
            grid = sample_images(pipe.unet, pipe.scheduler, cfg.sample_images, cfg.sample_steps, progress=progress)
            save_grid(grid, out / f"samples_{method}.png")
    if not rt.is_global_zero:
        rt.barrier()  # rank 0 writes the last files
        return "", records
    markdown = write_leaderboard(records, out, dataset=eval_cfg.dataset)
    _copy_best_segmentation_picture(records, out)
    write_json(
        out / "bench.json",
        {
            "preset": preset,
            "dataset": eval_cfg.dataset,
            "budget": str(cfg.budget),
            "methods": list(cfg.methods),
            "wall_seconds": time.perf_counter() - started,
            "runtime": {"device": str(rt.device), "world_size": rt.world_size, "precision": rt.lightning_precision},
        },
    )
    rt.barrier()
    return markdown, records


def _channels(cfg: EvalConfig) -> int:
    from .data import DATASETS

    return DATASETS[cfg.dataset].channels


def _size(cfg: EvalConfig) -> int:
    from .data import DATASETS

    return DATASETS[cfg.dataset].image_size


def _copy_best_segmentation_picture(records: list[dict], out: Path) -> Path | None:
    """``segmentation_best.png``: the picture (input, truth, prediction) of the learner with the best
    segmentation mIoU on test."""
    scored = [r for r in records if r["protocol"]["name"] == "segmentation" and r.get("split") == "test"]
    if not scored:
        return None
    best = max(scored, key=lambda r: r["value"])
    source = Path(best["picture"]) if best.get("picture") else None  # where the protocol wrote it
    if source is None or not source.is_file():
        return None
    target = out / "segmentation_best.png"
    shutil.copyfile(source, target)
    return target
