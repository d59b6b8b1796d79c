"""Where one learner's evaluation spends its time: every protocol of a bench preset (default: ``default``, the
main job's) run on one backbone, split into parts (seconds each), printed as a Markdown table and written as JSON.

    python benchmarks/eval_profile.py ddae                          # pretrain DDAE for a few steps first
    python benchmarks/eval_profile.py runs/bench/ddae/export        # an existing export folder
    python benchmarks/eval_profile.py mdsm --steps 0 --out prof.json

The evaluation's cost does not depend on how long the learner trained, so a learner name is pretrained for
``--steps`` optimisation steps (default 2) with the preset's method settings, exactly as ``diffssl bench`` builds
it. The feature cache starts empty (a fresh bench run's situation). Parts:

* ``extract`` calls (``EvalContext.features``), per protocol: in ``linear`` the call over several readouts is
  the sweep's (``sweep extract``), the others the final subsets' (``final extract``);
* ``EvalContext.once`` calls (the probes: sweep ``linear_probe`` calls, the final probe, kNN), by function;
* the segmentation protocols' dense-feature time (their records' ``cost.feature_seconds``);
* ``other``: the rest of each protocol (fine-tuning loops, segmentation heads, energy scoring, data loading).

On a shared CPU the absolute seconds depend on what else runs: the JSON records ``os.getloadavg()`` before and
after; compare runs made back to back and trust the proportions more than the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def load_learner(name_or_folder: str, preset, steps: int, work: Path):
    """(backbone, method name): an export folder as it is, or a learner pretrained for ``steps`` steps."""
    from diffssl_plugin.loading import is_export, load_backbone

    if Path(name_or_folder).is_dir():
        if not is_export(name_or_folder):
            raise SystemExit(f"{name_or_folder} is not an export folder")
        backbone = load_backbone(checkpoint=name_or_folder)
        return backbone, backbone.pretrained_cfg.get("architecture", Path(name_or_folder).parent.name)
    from diffssl_plugin.methods.training import Budget, pretrain

    result = pretrain(
        name_or_folder,
        preset.eval.dataset,
        Budget(steps=max(1, steps)),
        work / name_or_folder,
        batch_size=preset.batch_for(name_or_folder),
        progress=False,
        resume=False,
        max_images=preset.max_pretrain_images,
        method_kwargs=preset.method_kwargs.get(name_or_folder),
    )
    return load_backbone(checkpoint=Path(result.out_dir) / "export"), name_or_folder


def profile(model, method: str, preset, work: Path, protocols=None) -> tuple[dict, list[dict]]:
    """Run ``preset``'s protocols on ``model`` with a timed context; returns ({protocol: {part: s}}, records)."""
    from diffssl_plugin.eval import PROTOCOLS, EvalContext

    parts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    current = {"protocol": ""}

    class TimedContext(EvalContext):
        def features(self, data, readouts, *args, **kwargs):
            started = time.perf_counter()
            try:
                return super().features(data, readouts, *args, **kwargs)
            finally:
                sweep = current["protocol"] == "linear" and len(readouts) > 1
                part = "sweep extract" if sweep else "final extract" if current["protocol"] == "linear" else "extract"
                parts[current["protocol"]][part] += time.perf_counter() - started

        def once(self, fn, *args, **kwargs):
            started = time.perf_counter()
            try:
                return super().once(fn, *args, **kwargs)
            finally:
                name = getattr(fn, "__name__", "once")
                if current["protocol"] == "linear" and name == "linear_probe":
                    name = "sweep probes" if len(args) < 5 else "final linear_probe"
                parts[current["protocol"]][name] += time.perf_counter() - started

    ctx = TimedContext(
        model,
        method,
        model.pretrained_cfg.get("architecture", method),
        preset.eval,
        cache_dir=work / "feature_cache",
        out_dir=work / "out",
        progress=False,
    )
    records: list[dict] = []
    totals = {}
    for name in protocols or preset.protocols:
        current["protocol"] = name
        started = time.perf_counter()
        new = PROTOCOLS[name](ctx)
        totals[name] = time.perf_counter() - started
        for r in new:
            feature_s = (r.get("cost") or {}).get("feature_seconds")
            if feature_s is not None:
                parts[name]["dense extract"] += feature_s
        records += new
    table = {}
    for name, total in totals.items():
        known = dict(parts[name])
        table[name] = {**{k: round(v, 2) for k, v in known.items()}, "other": round(total - sum(known.values()), 2)}
        table[name]["total"] = round(total, 2)
    return table, records


def markdown(table: dict) -> str:
    lines = ["| protocol | part | seconds | share |", "|---|---|---:|---:|"]
    grand = sum(p["total"] for p in table.values())
    for name, p in table.items():
        for part, s in p.items():
            if part != "total":
                lines.append(f"| {name} | {part} | {s:.1f} | {100 * s / grand:.0f}% |")
        lines.append(f"| **{name}** | **total** | **{p['total']:.1f}** | **{100 * p['total'] / grand:.0f}%** |")
    lines.append(f"| **all** | | **{grand:.1f}** | 100% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("learner", help="a learner name (pretrained for --steps steps) or an export folder")
    parser.add_argument("--preset", default="default", help="bench preset whose protocols and EvalConfig run")
    parser.add_argument("--steps", type=int, default=2, help="pretraining steps for a learner name")
    parser.add_argument("--protocols", nargs="*", help="a subset of the preset's protocols (default: all)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--work", help="folder for the pretraining run, the feature cache and pictures (default: temp)")
    parser.add_argument("--out", default="eval_profile.json", help="JSON written here")
    args = parser.parse_args(argv)

    import torch

    from diffssl_plugin.bench import PRESETS

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        model, method = load_learner(args.learner, preset, args.steps, work)
        load_before = os.getloadavg()
        started = time.perf_counter()
        table, records = profile(model, method, preset, work, args.protocols)
        wall = time.perf_counter() - started
    result = {
        "learner": args.learner,
        "method": method,
        "preset": args.preset,
        "protocols": list(table),
        "wall_seconds": round(wall, 2),
        "parts": table,
        "records": len(records),
        "values": {f"{r['protocol']['name']}/{r['split']}/{r['dataset']}": r["value"] for r in records},
        "threads": torch.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown(table))
    print(f"\n{method}: {wall:.1f} s of evaluation; load average before {load_before}, after {os.getloadavg()}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
