"""Leaderboards rendered from records, never typed by hand: Markdown and CSV."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ..io import atomic_path

COLUMNS = [("linear", "linear"), ("knn20", "kNN k=20"), ("knn200", "kNN k=200")]


def leaderboard_rows(records: list[dict], dataset: str | None = None) -> list[dict]:
    """One row per (method, backbone): the latest test-split value of each protocol, with readout and budget."""
    rows: dict[tuple[str, str], dict] = {}
    for r in records:
        if r.get("split") != "test" or (dataset and r.get("dataset") != dataset):
            continue
        key = (r["method"], r["backbone"])
        row = rows.setdefault(key, {"method": r["method"], "backbone": r["backbone"], "dataset": r["dataset"]})
        row[r["protocol"]["name"]] = r["value"]
        readout = r.get("readout") or {}
        if readout.get("block"):
            row["readout"] = f"{readout['block']} @ t={readout['timestep']} ({readout['pool']})"
        budget = r.get("budget") or {}
        if budget:
            row["budget"] = budget
    return sorted(rows.values(), key=lambda row: -(row.get("linear") or 0.0))


def _budget_text(b: dict | None) -> str:
    if not b:
        return "-"
    parts = []
    if b.get("wall_seconds") is not None:
        parts.append(f"{b['wall_seconds'] / 60:.1f} min")
    if b.get("steps") is not None:
        parts.append(f"{b['steps']} steps")
    if b.get("train_flops"):
        parts.append(f"{b['train_flops'] / 1e12:.1f} TFLOP")
    return ", ".join(parts)


def _pct(v) -> str:
    return f"{100 * v:.1f}" if isinstance(v, (int, float)) else "-"


def render_markdown(rows: list[dict]) -> str:
    head = ["method", "backbone"] + [title for _, title in COLUMNS] + ["readout (chosen on val)", "budget spent"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["method"], row["backbone"]] + [_pct(row.get(k)) for k, _ in COLUMNS]
        cells += [row.get("readout", "-"), _budget_text(row.get("budget"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    fields = ["method", "backbone", "dataset"] + [k for k, _ in COLUMNS] + ["readout", "budget"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "budget": _budget_text(row.get("budget"))})
    return buf.getvalue()


def write_leaderboard(records: list[dict], out_dir: str | os.PathLike, dataset: str | None = None) -> str:
    """Write ``leaderboard.md`` and ``leaderboard.csv`` into ``out_dir``; return the Markdown."""
    rows = leaderboard_rows(records, dataset)
    md = render_markdown(rows)
    out = Path(out_dir)
    for name, text in (("leaderboard.md", md), ("leaderboard.csv", render_csv(rows))):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    return md
