"""CPU recipes chosen on validation: each learner's learning rate, batch, width and augmentation strength for the
main job's budget, scored on the **validation split only** (linear probe and kNN-20 on the frozen export).

    python benchmarks/recipe_search.py simclr                    # every SimCLR candidate in GRIDS
    python benchmarks/recipe_search.py mae --only lightly,lr3e-3 # some of them
    python benchmarks/recipe_search.py simclr --budget 2.5min --out runs/recipes

Each candidate pretrains from scratch under the same wall-clock budget (the ``default`` preset's unless
``--budget``), on the ``trainval`` split as ``diffssl bench`` does, then the harness's ``linear`` protocol runs on
the preset's train/val subsets (readouts swept on validation for the diffusion learners); the table reports the
validation accuracies only (the protocol's test subset is shrunk to 100 images and its number dropped). Results
are appended to ``<out>/<learner>.jsonl`` as each candidate finishes, a finished candidate is skipped when the
command is run again, and ``<out>/<learner>.md`` holds the table (best first). Timings depend on what else runs on
the machine: each row records the load average before it started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

#: candidates per learner: name -> {"batch_size": int (optional), "method_kwargs": {...}}, applied over the
#: default preset's settings for the learner ("default": the preset's as they are; SimCLR's "lightly": lightly's
#: CIFAR-10 recipe)
GRIDS: dict[str, dict[str, dict]] = {
    "simclr": {
        # lightly's CIFAR-10 benchmark: SGD 0.06·B/128, τ 0.5, ResNet-18, crop scale ≥ 0.08
        "lightly": {"batch_size": 128, "method_kwargs": {"lr": None, "temperature": 0.5, "min_scale": 0.08}},
        "lr0.3": {"method_kwargs": {"lr": 0.3}},
        "lr0.3_t0.2": {"method_kwargs": {"lr": 0.3, "temperature": 0.2}},
        "lr0.3_t0.2_s0.2": {"method_kwargs": {"lr": 0.3, "temperature": 0.2, "min_scale": 0.2}},
        "lr0.6_t0.2_s0.2_w10": {"method_kwargs": {"lr": 0.6, "temperature": 0.2, "min_scale": 0.2, "warmup_steps": 10}},
        "b64_lr0.3_t0.2_s0.2": {"batch_size": 64, "method_kwargs": {"lr": 0.3, "temperature": 0.2, "min_scale": 0.2}},
        # half width at the chosen batch: on a CPU without bf16 hardware full width makes ~50 steps in 2.5 minutes
        "half_width_b64_lr0.3_t0.2_s0.2": {
            "batch_size": 64,
            "method_kwargs": {
                "lr": 0.3,
                "temperature": 0.2,
                "min_scale": 0.2,
                "backbone_args": {"channels": [32, 64, 128, 256]},
            },
        },
        "half_width_lr0.3_t0.2_s0.2": {
            "method_kwargs": {
                "lr": 0.3,
                "temperature": 0.2,
                "min_scale": 0.2,
                "backbone_args": {"channels": [32, 64, 128, 256]},
            }
        },
    },
    "mae": {
        "default": {},  # AdamW 1.5e-3, mask 0.75, ViT-Tiny-like patch-4 encoder
        "lr3e-3": {"method_kwargs": {"lr": 3e-3}},
        "b64": {"batch_size": 64},
        "mask0.5": {"method_kwargs": {"mask_ratio": 0.5}},
        # half the encoder's depth (6 blocks; 0.34 training GFLOP per image against 0.55): more steps in the
        # budget, less evaluation compute; the sweep then reads blocks 3, 4, 5 and the output (2026-12-08, EPYC:
        # 345 steps against 217, evaluation 66 against 80 s, but 83.5 against 84.4 validation linear: not chosen)
        "depth6": {"method_kwargs": {"backbone_args": {"depth": 6}}},
    },
    "ddae": {
        "default": {},  # AdamW 5e-4 constant after 100 warm-up steps (DDPM: constant rate)
        "b64": {"batch_size": 64},
        "lr1e-3": {"method_kwargs": {"lr": 1e-3}},
        # a 10-step warm-up: a CPU without bf16 hardware makes ~95 steps in 2.5 minutes, all inside the 100-step one
        "warmup10": {"method_kwargs": {"warmup_steps": 10}},
    },
    "drl": {"default": {}, "lr1e-3": {"method_kwargs": {"lr": 1e-3}}},
    "vdrl": {"default": {}, "lr1e-3": {"method_kwargs": {"lr": 1e-3}}},
    "mdsm": {"default": {}, "b64": {"batch_size": 64}},
}


def run_candidate(learner: str, name: str, spec: dict, preset, budget, out: Path) -> dict:
    """Pretrain one candidate under ``budget`` and return its row (validation accuracies, what it spent)."""
    from diffssl_plugin.eval import evaluate
    from diffssl_plugin.loading import load_backbone
    from diffssl_plugin.methods.training import pretrain

    kwargs = {**(preset.method_kwargs.get(learner) or {}), **spec.get("method_kwargs", {})}
    batch = spec.get("batch_size", preset.batch_for(learner))
    load = os.getloadavg()[0]
    result = pretrain(
        learner,
        preset.eval.dataset,
        budget,
        out / learner / name,
        batch_size=batch,
        progress=False,
        resume=False,
        method_kwargs=kwargs,
        max_images=preset.max_pretrain_images,
    )
    backbone = load_backbone(checkpoint=Path(result.out_dir) / "export")
    config = replace(preset.eval, test_images=100, extra={})
    started = time.perf_counter()
    records = evaluate(backbone, learner, learner, config, protocols=("linear",), progress=False)
    by_name = {r["protocol"]["name"]: r for r in records if r["split"] == "test"}
    return {
        "learner": learner,
        "candidate": name,
        "batch_size": batch,
        "method_kwargs": kwargs,
        "budget": str(budget),
        "steps": result.steps,
        "images_seen": result.images_seen,
        "gflops_per_image": round(result.flops_per_image / 1e9, 3),
        "train_tflops": round(result.train_flops / 1e12, 1),
        "schedule_horizon": result.schedule_horizon,
        "val_linear": by_name["linear"]["val_acc"],
        "val_knn20": by_name["knn20"]["val_acc"],
        "readout": by_name["linear"].get("readout"),
        "eval_seconds": round(time.perf_counter() - started, 1),
        "load_before": round(load, 2),
    }


def table(rows: list[dict]) -> str:
    """Markdown table of the candidates, best validation linear accuracy first."""
    head = "| candidate | batch | steps | GFLOP/img | TFLOPs | val linear | val kNN-20 | load |\n" + "|---" * 8 + "|"
    lines = [
        f"| {r['candidate']} | {r['batch_size']} | {r['steps']} | {r['gflops_per_image']} | {r['train_tflops']} | "
        f"{100 * r['val_linear']:.1f} | {100 * r['val_knn20']:.1f} | {r['load_before']} |"
        for r in sorted(rows, key=lambda r: -r["val_linear"])
    ]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    from diffssl_plugin.bench import PRESETS
    from diffssl_plugin.methods.training import Budget

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("learner", choices=sorted(GRIDS))
    p.add_argument("--only", default=None, help="comma-separated candidate names (default: all)")
    p.add_argument("--budget", default=None, help="e.g. 2.5min (default: the default preset's)")
    p.add_argument("--out", default="runs/recipes")
    args = p.parse_args(argv)
    preset = PRESETS["default"]
    budget = Budget.parse(args.budget) if args.budget else preset.budget
    grid = GRIDS[args.learner]
    names = args.only.split(",") if args.only else list(grid)
    unknown = [n for n in names if n not in grid]
    if unknown:
        p.error(f"unknown candidates {unknown}; {args.learner} has {sorted(grid)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{args.learner}.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    done = {(r["candidate"], r["budget"]) for r in rows}
    for name in names:
        if (name, str(budget)) in done:
            continue
        row = run_candidate(args.learner, name, grid[name], preset, budget, out)
        rows.append(row)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    md = table([r for r in rows if r["budget"] == str(budget)])
    (out / f"{args.learner}.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
