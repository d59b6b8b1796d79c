"""Leaderboards rendered from records, never typed by hand: Markdown and CSV."""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from ..io import atomic_path

#: preferred column order and titles; protocols not listed here follow, in alphabetical order
COLUMN_TITLES = {
    "linear": "linear",
    "knn20": "kNN k=20",
    "knn200": "kNN k=200",
    "finetune": "fine-tune",
    "semisup1_linear": "1% linear",
    "semisup10_linear": "10% linear",
    "semisup1_ft": "1% fine-tune",
    "semisup10_ft": "10% fine-tune",
    "transfer_mnist5k": "→ MNIST-5k",
    "transfer_digits": "→ digits",
    "transfer_fashion_mnist_tops": "→ FMNIST tops",
    "segmentation": "seg. mIoU (linear)",
    "segmentation_mlp": "seg. mIoU (MLP)",
    "ood_mnist5k": "OOD AUROC: MNIST",
    "ood_uniform": "OOD AUROC: noise",
    "ood_vflip": "OOD AUROC: vflip",
    "attention": "attention head",
    "difformer": "DifFormer",
    "diffeed": "DifFeed",
}


_SEMISUP = re.compile(r"semisup(?P<percent>[0-9.]+)_(?P<sub>linear|ft)")


def column_title(protocol: str) -> str:
    """A protocol's column title: :data:`COLUMN_TITLES`, ``"<p>% linear"``/``"<p>% fine-tune"`` for any
    semi-supervised fraction, else the protocol's name."""
    if protocol in COLUMN_TITLES:
        return COLUMN_TITLES[protocol]
    m = _SEMISUP.fullmatch(protocol)
    if m:
        return f"{m['percent']}% {'linear' if m['sub'] == 'linear' else 'fine-tune'}"
    return protocol


def columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(protocol, title) for every protocol with a test value in ``rows``."""
    seen = {k for row in rows for k in row.get("values", {})}
    known = [(k, t) for k, t in COLUMN_TITLES.items() if k in seen]
    return known + [(k, column_title(k)) for k in sorted(seen - set(COLUMN_TITLES))]


def leaderboard_rows(records: list[dict], dataset: str | None = None) -> list[dict]:
    """One row per (method, backbone): the latest test-split value (and ``std`` if the record has one) of each
    protocol, with the readout and budget."""
    rows: dict[tuple[str, str], dict] = {}
    for r in records:
        # the evaluated (pretraining) dataset: transfer records carry their target in "dataset"
        evaluated = (r.get("eval_config") or {}).get("dataset", r.get("dataset"))
        if r.get("split") != "test" or (dataset and evaluated != dataset):
            continue
        key = (r["method"], r["backbone"])
        row = rows.setdefault(key, {"method": r["method"], "backbone": r["backbone"], "dataset": evaluated})
        row.setdefault("values", {})[r["protocol"]["name"]] = (r["value"], r.get("std"))
        readout = r.get("readout") or {}
        if r["protocol"]["name"] == "linear" and readout.get("block"):  # the readout the sweep chose
            row["readout"] = f"{readout['block']} @ t={readout.get('timestep')} ({readout.get('pool')})"
        elif r["protocol"]["name"] == "linear" and readout:
            row["readout"] = "pooled output"
        budget = r.get("budget") or {}
        if budget:
            row["budget"] = budget
    return sorted(rows.values(), key=lambda row: -(row.get("values", {}).get("linear", (0.0,))[0] or 0.0))


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


def _pct(entry) -> str:
    """A value (and optional std over seeds) in percent."""
    if not entry or not isinstance(entry[0], (int, float)):
        return "-"
    value, std = entry
    return f"{100 * value:.1f} ± {100 * std:.1f}" if std is not None else f"{100 * value:.1f}"


def render_markdown(rows: list[dict]) -> str:
    cols = columns(rows)
    head = ["method", "backbone"] + [title for _, title in cols] + ["readout (chosen on val)", "budget spent"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["method"], row["backbone"]] + [_pct(row.get("values", {}).get(k)) for k, _ in cols]
        cells += [row.get("readout", "-"), _budget_text(row.get("budget"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    cols = [k for k, _ in columns(rows)]
    fields = ["method", "backbone", "dataset"] + cols + [f"{k}_std" for k in cols] + ["readout", "budget"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        values = row.get("values", {})
        flat = {k: values[k][0] for k in cols if k in values}
        flat.update({f"{k}_std": values[k][1] for k in cols if k in values and values[k][1] is not None})
        writer.writerow({**row, **flat, "budget": _budget_text(row.get("budget"))})
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
