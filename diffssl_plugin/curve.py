"""``diffssl bench --preset curve``: learning curves by resuming one run per learner.

Each learner is pretrained once, toward the last point of the curve (the learning-rate schedule's horizon), and
stopped at every point on the way (e.g. 1, 3 and 10 minutes): ``pretrain`` writes the export, the harness's
``linear`` protocol (readout sweep, linear probe, kNN) evaluates it, and training resumes from ``last.ckpt``
toward the next point. Budgets are cumulative (the 3-minute point's record says 3 minutes of training in all)
and evaluation time is not training time. The output folder gets ``records.jsonl`` (each record tagged with its
point in ``curve``), ``curve.md`` (learner × point table) and ``curve.png`` (linear accuracy against TFLOPs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError
from .eval import EvalConfig, evaluate, read_records, write_records
from .eval.records import record_problem
from .io import atomic_path, file_sha256, write_json
from .loading import load_backbone, read_pretrain_info
from .methods.training import Budget, budget_spent, pretrain
from .presets import raw_pixels_floor
from .runtime import Runtime, current

if TYPE_CHECKING:
    from .presets import BenchPreset

#: the protocol each point is evaluated with (linear probe and kNN, after the readout sweep)
CURVE_PROTOCOLS = ("linear",)
_UNITS = ("minutes", "flops", "steps")


def curve_points(points: Sequence[Budget], last: Budget | None = None) -> tuple[Budget, ...]:
    """The curve's points; with ``last`` (``--budget``), the points scaled so that the last one is ``last``
    (each keeps its fraction of the preset's last point: 1, 3, 10 min with ``last`` = 500 steps gives
    50, 150 and 500 steps). Points that scaling makes equal are kept once."""
    if not points:
        raise ValueError("a learning curve needs at least one point")
    if last is None:
        return tuple(points)
    scaled = [_scaled(last, _fraction(p, points[-1])) for p in points]
    return tuple(dict.fromkeys(scaled))


def _fraction(point: Budget, last: Budget) -> float:
    """``point`` as a fraction of ``last``, in the first unit both state."""
    for unit in _UNITS:
        a, b = getattr(point, unit), getattr(last, unit)
        if a is not None and b:
            return a / b
    raise ValueError(f"curve point {point} and last point {last} share no unit")


def _scaled(budget: Budget, fraction: float) -> Budget:
    """``budget`` × ``fraction`` in every unit it states (at least one step)."""
    return Budget(
        minutes=budget.minutes * fraction if budget.minutes is not None else None,
        flops=budget.flops * fraction if budget.flops is not None else None,
        steps=max(1, round(budget.steps * fraction)) if budget.steps is not None else None,
    )


def run_curve(
    cfg: BenchPreset,
    eval_cfg: EvalConfig,
    out_dir: str | os.PathLike,
    last: Budget | None = None,
    preset: str = "curve",
    data_root: str | None = None,
    progress: bool = True,
    resume: bool = True,
    runtime: Runtime | None = None,
) -> tuple[str, list[dict]]:
    """Train each of ``cfg.methods`` through ``cfg.curve_points`` (scaled to end at ``last`` if given) as one
    run, evaluate each point, and return (the ``curve.md`` table, the records). ``run_bench`` hands over here.

    Re-running with the same ``out_dir`` does not redo finished points: a point whose records are in
    ``records.jsonl`` (same learner, dataset, point and horizon) is skipped and its records reused; a point
    whose export is already there (``export/pretrain.json`` names its budget: stopped after training, before
    its records were written) is evaluated without training; any other point resumes from ``last.ckpt``.
    A run already trained past a point whose records are missing cannot go back to it (:class:`UsageError`).
    Changing the points changes the horizon: use a new folder, or ``resume=False`` (start every learner over).

    Every rank calls this (pretraining is DDP, extraction sharded); rank 0 reads what is done and hands it to
    the others, and alone writes records, table, plot and ``bench.json``.
    """
    rt = (runtime or current()).launch()
    points = curve_points(cfg.curve_points or (), last)
    horizon = points[-1]
    out = Path(out_dir)
    started = time.perf_counter()
    done = _finished(out / "records.jsonl", eval_cfg.dataset, horizon) if resume and rt.is_global_zero else {}
    done = rt.broadcast(done)
    common = {
        "config": eval_cfg,
        "protocols": CURVE_PROTOCOLS,
        "cache_dir": out / "feature_cache",
        "progress": progress,
        "runtime": rt,
    }
    records: list[dict] = []

    def publish(new: list[dict], tag: dict) -> None:
        """Tag a point's records, keep them, and append them to ``records.jsonl`` (rank 0 writes)."""
        for r in new:
            r["curve"] = {**tag, "horizon": str(horizon)}
        records.extend(new)
        if rt.is_global_zero:
            write_records(out / "records.jsonl", new)

    if ("raw_pixels", None) in done:
        records.extend(done["raw_pixels", None])
    else:
        raw = raw_pixels_floor(eval_cfg)
        publish(evaluate(raw, "raw_pixels", "raw_pixels", out_dir=out, **common), {"point": None, "index": None})
    for method in cfg.methods:
        run_dir = out / method
        for index, point in enumerate(points):
            if (method, str(point)) in done:
                records.extend(done[method, str(point)])
                continue
            info = read_pretrain_info(run_dir / "export") if rt.is_global_zero and run_dir.is_dir() else None
            info = rt.broadcast(info)
            if resume and _is_point(info, method, eval_cfg.dataset, *points[index + 1 :]):
                raise UsageError(
                    f"{run_dir} is trained to {info['budget']} already, past {point}, whose records are missing: "
                    "start over (--no-resume) or use another output folder"
                )
            trained = (resume or index > 0) and _is_point(info, method, eval_cfg.dataset, point)
            if not trained:  # train on to this point (the first point of a fresh run starts over)
                info = pretrain(
                    method,
                    eval_cfg.dataset,
                    point,
                    run_dir,
                    batch_size=cfg.batch_for(method),
                    data_root=data_root,
                    runtime=rt,
                    progress=progress,
                    resume=resume or index > 0,
                    max_images=cfg.max_pretrain_images,
                    method_kwargs=cfg.method_kwargs.get(method),
                    horizon=horizon,
                ).as_record()
            export_dir = run_dir / "export"
            backbone = load_backbone(checkpoint=export_dir)
            new = evaluate(
                backbone,
                method,
                backbone.pretrained_cfg.get("architecture", method),
                budget=budget_spent(info),
                checkpoint_hash=file_sha256(export_dir / "backbone")[:16],
                out_dir=run_dir / f"eval_{point}",  # this point's sweep heatmap
                **common,
            )
            publish(new, {"point": str(point), "index": index, "schedule_horizon": info.get("schedule_horizon")})
    if not rt.is_global_zero:
        rt.barrier()  # rank 0 writes the last files
        return "", records
    markdown = curve_table(records, knn=f"knn{eval_cfg.knn_ks[0]}" if eval_cfg.knn_ks else None)
    with atomic_path(out / "curve.md") as tmp:
        tmp.write_text(markdown)
    plot_curve(records, out / "curve.png", title=f"{eval_cfg.dataset}: learning curves (one run per learner)")
    write_json(
        out / "bench.json",
        {
            "preset": preset,
            "dataset": eval_cfg.dataset,
            "points": [str(p) for p in points],
            "horizon": str(horizon),
            "methods": list(cfg.methods),
            "wall_seconds": time.perf_counter() - started,
            "runtime": {"device": str(rt.device), "world_size": rt.world_size, "precision": rt.lightning_precision},
        },
    )
    rt.barrier()
    return markdown, records


def _is_point(info: dict | None, method: str, dataset: str, *points: Budget) -> bool:
    """Whether the export's ``pretrain.json`` (``info``) is ``method`` on ``dataset`` trained to one of ``points``."""
    if not info or (info.get("method"), info.get("dataset")) != (method, dataset):
        return False
    return info.get("budget") in {str(p) for p in points}


def _finished(path: Path, dataset: str, horizon: Budget) -> dict[tuple[str, str | None], list[dict]]:
    """The curve records already in ``path``, by (learner, point) (raw pixels: point None), for ``dataset`` and
    ``horizon``; where a point was evaluated more than once, its latest evaluation (checkpoint hash) wins."""
    if not path.is_file():
        return {}
    found: dict[tuple[str, str | None], list[dict]] = {}
    for r in read_records(path, check=record_problem):
        tag = r.get("curve")
        if not isinstance(tag, dict) or (r.get("eval_config") or {}).get("dataset") != dataset:
            continue
        if r["method"] != "raw_pixels" and tag.get("horizon") != str(horizon):
            continue
        key = (r["method"], tag.get("point"))
        kept = found.setdefault(key, [])
        if kept and kept[-1].get("checkpoint_hash") != r.get("checkpoint_hash"):
            kept.clear()  # a later evaluation of this point replaces the earlier one
        kept.append(r)
    # a point counts as done only with its linear test record (the protocol's last record is kNN)
    return {k: v for k, v in found.items() if any(_is_test(r, "linear") for r in v)}


def _is_test(record: dict, protocol: str) -> bool:
    return record.get("split") == "test" and record["protocol"]["name"] == protocol


def _curve_rows(records: list[dict], knn: str | None) -> list[dict]:
    """One row per (learner, point) in the order first seen: point, budget spent, linear and kNN accuracy."""
    rows: dict[tuple[str, int | None], dict] = {}
    for r in records:
        tag = r.get("curve") or {}
        row = rows.setdefault(
            (r["method"], tag.get("index")), {"method": r["method"], "point": tag.get("point"), **r.get("budget", {})}
        )
        if _is_test(r, "linear"):
            row["linear"] = r["value"]
        elif knn and _is_test(r, knn):
            row["knn"] = r["value"]
    return list(rows.values())


def curve_table(records: list[dict], knn: str | None = "knn20") -> str:
    """Markdown: one row per learner × point (training minutes, steps, TFLOPs, linear and ``knn`` test
    accuracy), raw pixels first (no training)."""

    def num(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    knn_title = f"kNN k={knn.removeprefix('knn')} %" if knn else "kNN %"
    lines = [
        f"| learner | point | minutes | steps | TFLOPs | linear % | {knn_title} |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    rows = sorted(_curve_rows(records, knn), key=lambda row: row["method"] != "raw_pixels")  # stable
    for row in rows:
        wall, flops = row.get("wall_seconds"), row.get("train_flops")
        pct = [num(100 * row[k] if row.get(k) is not None else None, ".1f") for k in ("linear", "knn")]
        lines.append(
            f"| {row['method'].replace('_', ' ')} | {row['point'] or '—'} | {num(wall and wall / 60, '.2f')} "
            f"| {num(row.get('steps'), 'd')} | {num(flops and flops / 1e12, '.3g')} | {pct[0]} | {pct[1]} |"
        )
    return "\n".join(lines) + "\n"


def plot_curve(records: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Linear-probe test accuracy against training TFLOPs (log scale): one line with markers per learner, raw
    pixels as a dashed horizontal line. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    by_method: dict[str, list[tuple[float, float]]] = {}
    for row in _curve_rows(records, None):
        if row.get("linear") is None:
            continue
        if row["method"] == "raw_pixels":
            ax.axhline(100 * row["linear"], color="0.4", linestyle="--", label="raw pixels")
        elif (row.get("train_flops") or 0) > 0:  # a log axis has no place for zero training
            by_method.setdefault(row["method"], []).append((row["train_flops"] / 1e12, 100 * row["linear"]))
    for method, xy in by_method.items():
        xs, ys = zip(*sorted(xy))
        ax.plot(xs, ys, marker="o", label=method)
    if by_method:
        ax.set_xscale("log")
    ax.set_xlabel("training TFLOPs")
    ax.set_ylabel("linear probe test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
