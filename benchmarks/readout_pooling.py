"""How much of a swept readout's linear accuracy is learning: each pooling of the main job's sweep, on a trained
export and on the same architecture at its random initialisation, beside raw pixels.

    python benchmarks/readout_pooling.py runs/bench/ddae/export runs/bench/mae/export
    python benchmarks/readout_pooling.py runs/bench/ddae/export --pools avg2x2,avg4x4 --out pooling.json

For every export and every pooling the harness's ``linear`` protocol runs with the ``default`` preset's splits,
timesteps, blocks and C grids but that one pooling: the sweep picks block × timestep on validation, then the
linear probe and kNN-20 are scored on test. The same is done on a freshly initialised copy of the architecture
(``timm.create_model("local-dir:EXPORT", pretrained=False)``, seed 0) — the floor that shows what training added
at each pooling — and once on raw pixels. The main job sweeps all the poolings together, so its choice is the
pooling whose best sweep validation accuracy is highest (``main_job_pick``). Prints a Markdown table
and writes JSON; features are cached under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def linear_row(model, name: str, cfg, work: Path) -> dict:
    """The ``linear`` protocol on ``model`` under ``cfg``: chosen readout, sweep validation, test linear, kNN-20."""
    from diffssl_plugin.eval import PROTOCOLS, EvalContext

    ctx = EvalContext(model, name, name, cfg, cache_dir=work / "feature_cache", out_dir=None, progress=False)
    started = time.perf_counter()
    records = PROTOCOLS["linear"](ctx)
    by_name = {r["protocol"]["name"]: r for r in records if r["split"] == "test"}
    sweep = [r["value"] for r in records if r["protocol"]["name"] == "sweep_linear"]
    ro = ctx.readout()
    return {
        "readout": "pooled output" if ro.block is None else f"{ro.block} @ t={ro.timestep} ({ro.pool})",
        "sweep_val": round(100 * max(sweep), 2) if sweep else None,
        "linear": round(100 * by_name["linear"]["value"], 2),
        "knn20": round(100 * by_name["knn20"]["value"], 2) if "knn20" in by_name else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def compare(export: str, pools: list[str], cfg, work: Path, seed: int = 0) -> list[dict]:
    """Rows for ``export`` trained and at random initialisation, one per pooling."""
    import timm
    import torch

    from diffssl_plugin.loading import load_backbone

    folder = Path(export) / "backbone" if (Path(export) / "backbone").is_dir() else Path(export)
    trained = load_backbone(checkpoint=export)
    torch.manual_seed(seed)
    untrained = timm.create_model(f"local-dir:{folder}", pretrained=False).eval()
    arch = trained.pretrained_cfg.get("architecture", folder.parent.name)
    rows = []
    for init, model in (("trained", trained), (f"random (seed {seed})", untrained)):
        for pool in pools:
            row = linear_row(model, arch, replace(cfg, pools=(pool,)), work / init.split()[0] / arch)
            rows.append({"export": str(export), "backbone": arch, "init": init, "pool": pool, **row})
        candidates = [r for r in rows if r["init"] == init and r["sweep_val"] is not None]
        if candidates:
            max(candidates, key=lambda r: r["sweep_val"])["main_job_pick"] = True
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| backbone | weights | pooling | readout (chosen on val) | sweep val | test linear | test kNN-20 |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        pick = " ← main job's pick" if r.get("main_job_pick") else ""
        knn = "-" if r["knn20"] is None else f"{r['knn20']:.1f}"
        lines.append(
            f"| {r['backbone']} | {r['init']} | {r['pool']}{pick} | {r['readout']} | {r['sweep_val'] or '-'} "
            f"| {r['linear']:.1f} | {knn} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", help="export folders (from diffssl pretrain / bench)")
    parser.add_argument("--preset", default="default", help="bench preset whose evaluation settings are used")
    parser.add_argument("--pools", default=None, help="comma-separated poolings (default: the preset's)")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw-pixel row")
    parser.add_argument("--work", help="feature cache folder (default: temporary)")
    parser.add_argument("--out", default="readout_pooling.json")
    args = parser.parse_args(argv)

    import torch

    from diffssl_plugin.bench import PRESETS
    from diffssl_plugin.presets import raw_pixels_floor

    cfg = PRESETS[args.preset].eval
    pools = args.pools.split(",") if args.pools else list(cfg.pools)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if not args.no_raw:
            row = linear_row(raw_pixels_floor(cfg), "raw_pixels", cfg, work / "raw")
            rows.append({"export": None, "backbone": "raw_pixels", "init": "-", "pool": "-", **row})
        for export in args.exports:
            rows += compare(export, pools, cfg, work)
            print(markdown(rows), flush=True)
    result = {
        "preset": args.preset,
        "pools": pools,
        "threads": torch.get_num_threads(),
        "images": {"train": cfg.train_images, "val": cfg.val_images, "test": cfg.test_images},
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
