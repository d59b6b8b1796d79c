"""``diffssl bench``: the main job. Pretrain every benchmarked learner under one budget on one dataset,
evaluate each (and the raw-pixel floor) with the same harness, and write records, a leaderboard, sweep
heatmaps and a sample grid."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from .errors import check_name
from .eval import evaluate, write_leaderboard, write_records
from .io import file_sha256, write_json
from .loading import load_backbone
from .methods.training import Budget, budget_spent, pretrain
from .presets import (  # noqa: F401 -- re-exported: the presets' names have always been importable from here
    ALL_LEARNERS,
    ALL_PROTOCOLS,
    HEAD_PROTOCOLS,
    PRESETS,
    BenchPreset,
    raw_pixels_floor,
)
from .runtime import Runtime, current


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
            raw_pixels_floor(eval_cfg),
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
