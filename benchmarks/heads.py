"""Heads on one frozen DDAE checkpoint: GAP/pooled linear probe vs attention head vs DifFormer vs DifFeed.

For each head: test accuracy (validation picks the probe's C / the head's epoch), trainable parameters,
training images/s and peak memory. Every head runs in its own fresh process (so the peak memory is that
head's):
``ru_maxrss`` of that process on a CPU, ``torch.cuda.max_memory_allocated`` on a GPU. The linear row is the
harness's ``linear`` protocol (block × timestep × pooling sweep on validation, then an L-BFGS logistic
regression); its images/s is training images / seconds of the final full-batch L-BFGS fit (no epochs), so
compare it loosely. The attention and DifFormer rows include extracting and caching their feature maps in
their wall time and memory; their images/s counts optimisation only.

    python benchmarks/heads.py --budget 4min                      # pretrain a DDAE first, then compare
    python benchmarks/heads.py --checkpoint runs/bench/ddae/export # an existing export folder

Writes ``heads.json`` (and the records) under ``--out`` and prints a Markdown table. On a shared CPU the
timings depend on what else runs; the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

HEADS = ("linear", "attention", "difformer", "diffeed")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_head(
    name: str,
    checkpoint: str,
    config: dict,
    cache_dir: str,
    device: str,
    threads: int | None,
    best_readout: dict | None,
) -> dict:
    """One head in this (fresh) process: returns its record plus the process's memory."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from diffssl_plugin.eval import PROTOCOLS, EvalConfig, EvalContext, Readout
    from diffssl_plugin.eval.features import extract_features
    from diffssl_plugin.eval.probes import linear_probe
    from diffssl_plugin.heads.training import peak_memory_mb
    from diffssl_plugin.loading import load_backbone

    model = load_backbone(checkpoint)
    ctx = EvalContext(
        model,
        "ddae",
        model.pretrained_cfg.get("architecture", "ddae"),
        EvalConfig(**config),
        cache_dir=cache_dir,
        device=device,
        progress=False,
    )
    ctx.splits()
    baseline = _rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if best_readout:
        ctx.best_readout = Readout(**best_readout)
    started = time.perf_counter()
    records = PROTOCOLS[name](ctx)
    wall = time.perf_counter() - started
    out = {"head": name, "baseline_rss_mb": round(baseline, 1), "wall_seconds": round(wall, 1)}
    if name == "linear":
        rec = next(r for r in records if r["protocol"]["name"] == "linear")
        best = ctx.best_readout
        train, val, test = ctx.splits()
        feats = [
            extract_features(model, d, [best], cache_dir=cache_dir, model_hash=ctx.model_hash, progress=False)[best]
            for d in (train, val, test)
        ]
        t0 = time.perf_counter()
        linear_probe(feats[0], train.labels, feats[1], val.labels, cs=[rec["protocol"]["C"]], seed=0)
        fit = time.perf_counter() - t0
        out.update(
            trainable_params=(feats[0].shape[1] + 1) * train.num_classes,
            train_images_per_s=round(len(train) / fit, 1),
            train_seconds=round(fit, 2),
            best_readout=asdict(best),
        )
    else:
        if not records:
            return {**out, "skipped": True}
        rec = records[0]
        out.update(
            trainable_params=rec["trainable_params"],
            train_images_per_s=rec["train_images_per_s"],
            train_seconds=rec["train_seconds"],
            feature_cache_mb=rec["cost"]["feature_cache_mb"],
            head_train_images=rec["head_train_images"],
            best_epoch=rec["best_epoch"],
        )
    out.update(
        test_acc=rec["value"],
        val_acc=rec.get("val_acc"),
        protocol=rec["protocol"],
        peak_memory_mb=round(peak_memory_mb(device), 1),
        peak_memory_kind="cuda_max_allocated" if device.startswith("cuda") else "process_max_rss",
        records=records,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a DDAE export folder (else pretrain one, --budget)")
    p.add_argument("--budget", default="4min", help="DDAE pretraining budget when no --checkpoint, e.g. 4min")
    p.add_argument("--out", default="runs/heads")
    p.add_argument("--heads", default=",".join(HEADS))
    p.add_argument("--train-images", type=int, default=10000)
    p.add_argument("--val-images", type=int, default=5000)
    p.add_argument("--test-images", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="epochs of the attention and DifFormer heads")
    p.add_argument("--diffeed-train-images", type=int, default=None)
    p.add_argument("--diffeed-epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads per head process")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pretrain_info = None
    checkpoint = args.checkpoint
    if checkpoint is None:
        from diffssl_plugin.methods.training import Budget, pretrain

        result = pretrain("ddae", "fashion_mnist", Budget.parse(args.budget), out / "ddae", progress=False)
        pretrain_info = result.as_record()
        checkpoint = str(Path(result.out_dir) / "export")
    else:
        from diffssl_plugin.loading import read_pretrain_info

        pretrain_info = read_pretrain_info(checkpoint)

    extra: dict = {}
    if args.epochs:
        for name in ("attention", "difformer"):
            extra[name] = {"training_kwargs": {"epochs": args.epochs}}
    if args.diffeed_train_images:
        extra.setdefault("diffeed", {})["train_images"] = args.diffeed_train_images
    if args.diffeed_epochs:
        extra.setdefault("diffeed", {})["training_kwargs"] = {
            "epochs": args.diffeed_epochs,
            "eval_every": args.diffeed_epochs,
        }
    config = {
        "train_images": args.train_images,
        "val_images": args.val_images,
        "test_images": args.test_images,
        "extra": extra,
    }
    load_before = os.getloadavg()
    rows, best = [], None
    ctx = mp.get_context("spawn")
    for name in args.heads.split(","):
        with ctx.Pool(1) as pool:
            row = pool.apply(
                run_head, (name, checkpoint, config, str(out / "feature_cache"), args.device, args.threads, best)
            )
        if name == "linear":
            best = row["best_readout"]
        rows.append(row)
        print(
            f"{name}: {json.dumps({k: v for k, v in row.items() if k not in ('records', 'protocol')})}",
            file=sys.stderr,
            flush=True,
        )
    report = {
        "checkpoint": checkpoint,
        "pretrain": pretrain_info,
        "eval_config": config,
        "device": args.device,
        "threads": args.threads,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "rows": [{k: v for k, v in r.items() if k != "records"} for r in rows],
    }
    from diffssl_plugin.io import write_json

    write_json(out / "heads.json", report)
    with open(out / "records.jsonl", "a") as f:
        for r in rows:
            for rec in r.get("records", []):
                f.write(json.dumps(rec, default=str) + "\n")
    print(markdown(report["rows"]))
    print(
        f"\nwritten {out / 'heads.json'}; load average {load_before} → {report['loadavg_after']} "
        f"on {os.cpu_count()} CPUs"
    )
    return 0


def markdown(rows: list[dict]) -> str:
    lines = [
        "| head | test acc % | val acc % | trainable params | train img/s | peak memory MB | cache MB | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['head']} | skipped | | | | | | |")
            continue
        val = f"{100 * r['val_acc']:.1f}" if r.get("val_acc") is not None else "-"
        lines.append(
            f"| {r['head']} | {100 * r['test_acc']:.1f} | {val} | {r['trainable_params']:,} | "
            f"{r['train_images_per_s']:.0f} | {r['peak_memory_mb']:.0f} | "
            f"{r.get('feature_cache_mb') if r.get('feature_cache_mb') is not None else '-'} | "
            f"{r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
