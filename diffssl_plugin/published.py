"""Published-result configs read by ``diffssl reproduce`` (:mod:`diffssl_plugin.reproduce`): their schema, loading,
and the comparison of our records with the paper's rows.

A reproduction config is a reference config (:mod:`diffssl_plugin.methods.reference_configs`, the same YAML
files) with four more keys:

* ``published``: the paper's rows, each ``{id, value, unit, metric, protocol, source, hand, ...}``. ``protocol``
  names the harness record the row is compared with (``linear``, ``knn200``, ``finetune``, ``attention``,
  ``difformer``, ``diffeed``), or is ``null`` when this package cannot measure it (FID, IS); ``hand`` says
  whether we read the number ourselves (``first-hand``: the paper's text, abstract or official repository) or
  only through another source (``second-hand``); ``eval`` overrides evaluation settings for that row (e.g. the
  number of labels); ``comparable: false`` marks context rows from another dataset or model (no gap is
  computed).
* ``eval``: the protocols to run and :class:`~diffssl_plugin.eval.EvalConfig` fields (dataset, readouts,
  probe sizes, ``extra`` protocol settings).
* ``compute``: the expected cost (``gpu_hours``, ``gpu``, ``basis``: how it was estimated).
* ``checkpoint`` (eval-only configs): the published checkpoint the numbers were measured on (``kind`` for
  :func:`diffssl_plugin.checkpoints.load_backbone_checkpoint`, ``file``, ``url``) and ``backbone``, the
  architecture to build without it (for ``--dry-run``); ``dry_run`` may shrink that architecture
  (``unet_overrides``), flagged "dry-run scale" in the output.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import InputError

#: keys a reproduction config adds to the reference-config keys (all of them are read here)
PUBLISHED_KEYS = {
    "id",
    "value",
    "unit",
    "metric",
    "protocol",
    "source",
    "hand",
    "tag",
    "dataset",
    "comparable",
    "eval",
    "note",
}
PUBLISHED_REQUIRED = {"id", "value", "unit", "metric", "protocol", "source", "hand"}
COMPUTE_KEYS = {"gpu_hours", "gpu", "basis", "pretrain_gpu_hours", "eval_gpu_hours", "published_runtime"}
CHECKPOINT_KEYS = {"kind", "file", "url", "method", "backbone", "settings", "note"}
DRY_RUN_KEYS = {"scale", "unet_overrides", "method_kwargs", "note"}
UNITS = ("%", "fraction", "FID", "IS")
HANDS = ("first-hand", "second-hand")


# ---------------------------------------------------------------------------------------------- configs
@dataclass
class Reproduction:
    """A checked reproduction config."""

    name: str
    path: Path
    raw: dict
    published: list[dict]
    protocols: tuple[str, ...]
    eval_fields: dict
    compute: dict
    checkpoint: dict | None = None
    dry_run: dict = field(default_factory=dict)

    @property
    def dataset(self) -> str:
        return self.raw["dataset"]

    @property
    def eval_only(self) -> bool:
        return "method" not in self.raw

    @property
    def title(self) -> str:
        return self.raw.get("title", self.name)

    def method_name(self) -> str:
        return self.raw.get("method") or (self.checkpoint or {}).get("method") or self.name


def config_names() -> list[str]:
    """Every config in ``diffssl_plugin/configs``, sorted."""
    from .methods.reference_configs import CONFIG_DIR

    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []


def _check_keys(where: str, given: dict, valid: set, required: set = frozenset()) -> None:
    if not isinstance(given, dict):
        raise InputError(f"{where} must be a mapping, got {type(given).__name__}")
    unknown, missing = sorted(set(given) - valid), sorted(set(required) - set(given))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
    if missing:
        raise InputError(f"{where}: missing key(s) {missing}")


def load_reproduction(name: str | os.PathLike) -> Reproduction:
    """Read and check a reproduction config: a name in ``diffssl_plugin/configs`` or a YAML path. Unknown
    names raise an error listing the known configs; unknown or missing keys raise :class:`InputError` naming
    them."""
    from .errors import check_name
    from .eval import PROTOCOLS, EvalConfig
    from .methods.reference_configs import config_path, load_config

    path = config_path(name)
    raw = load_config(path)
    for key in ("published", "eval", "compute"):
        if key not in raw:
            raise InputError(
                f"{path}: missing key {key!r}: a reproduction config needs 'published', 'eval' and 'compute'"
            )
    if "method" not in raw and "checkpoint" not in raw:
        raise InputError(f"{path}: a config without 'method' (nothing to pretrain) needs a 'checkpoint'")
    published = raw["published"]
    if not isinstance(published, list) or not published:
        raise InputError(f"{path}: 'published' must be a non-empty list of rows")
    for i, row in enumerate(published):
        _check_keys(f"{path}: published[{i}]", row, PUBLISHED_KEYS, PUBLISHED_REQUIRED)
        check_name("unit", row["unit"], UNITS)
        check_name("hand", row["hand"], HANDS)
        if row["protocol"] is not None:
            check_name("protocol", row["protocol"].split(":")[0], [*list(PROTOCOLS), "knn20", "knn200"])
    eval_fields = dict(raw["eval"])
    protocols = tuple(eval_fields.pop("protocols", ("linear",)))
    for p in protocols:
        check_name("protocol", p, PROTOCOLS)
    valid = {f.name for f in fields(EvalConfig)}
    _check_keys(f"{path}: eval", eval_fields, valid | {"protocols"})
    for row in published:
        _check_keys(f"{path}: published {row['id']!r} eval", row.get("eval") or {}, valid)
    _check_keys(f"{path}: compute", raw["compute"], COMPUTE_KEYS, {"gpu_hours", "gpu", "basis"})
    checkpoint = raw.get("checkpoint")
    if checkpoint is not None:
        _check_keys(f"{path}: checkpoint", checkpoint, CHECKPOINT_KEYS, {"kind", "file"})
    dry_run = raw.get("dry_run") or {}
    _check_keys(f"{path}: dry_run", dry_run, DRY_RUN_KEYS)
    return Reproduction(
        Path(path).stem, Path(path), raw, published, protocols, eval_fields, raw["compute"], checkpoint, dry_run
    )


def eval_config(rep: Reproduction, overrides: dict | None = None, **changes):
    """The :class:`EvalConfig` of ``rep`` (lists become tuples) with a row's ``overrides`` and ``changes``."""
    from .eval import EvalConfig

    values = {**rep.eval_fields, **(overrides or {}), **changes}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    values.setdefault("dataset", rep.dataset)
    return EvalConfig(**values)


def row_groups(rep: Reproduction) -> list[tuple[dict, list[dict]]]:
    """Published rows grouped by their ``eval`` overrides: one evaluation per group."""
    groups: dict[str, tuple[dict, list[dict]]] = {}
    for row in rep.published:
        overrides = row.get("eval") or {}
        groups.setdefault(json.dumps(overrides, sort_keys=True), (overrides, []))[1].append(row)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------- comparison
def as_percent(value: float, unit: str) -> float:
    return 100.0 * value if unit == "fraction" else value


def record_value(row: dict, records: list[dict]) -> float | None:
    """Our number for a published row: the latest test record of its protocol, in the row's unit."""
    if row["protocol"] is None:
        return None
    hits = [r for r in records if r.get("split") == "test" and r["protocol"]["name"] == row["protocol"]]
    if not hits:
        return None
    value = float(hits[-1]["value"])  # records hold fractions
    return value if row["unit"] == "fraction" else 100.0 * value


def reference_field(rep: Reproduction, row: dict, ours: float | None, dry_run: bool) -> dict:
    """The ``reference`` field written into the record a published row is compared with."""
    gap = None
    if ours is not None and row.get("comparable", True) and row["value"] is not None:
        gap = round(as_percent(ours, row["unit"]) - as_percent(row["value"], row["unit"]), 3)
    return {
        "config": rep.name,
        "row": row["id"],
        "published": row["value"],
        "unit": row["unit"],
        "metric": row["metric"],
        "source": row["source"],
        "hand": row["hand"],
        "tag": row.get("tag"),
        "comparable": row.get("comparable", True),
        "ours": ours,
        "gap_points": gap,
        "dry_run": dry_run,
    }


def _fmt(value, unit: str, missing: str = "-") -> str:
    if value is None:
        return missing
    return f"{value:.3f}" if unit == "fraction" else f"{value:.2f}"


def comparison_table(rep: Reproduction, refs: list[dict]) -> str:
    """Markdown: each published row, our number and the gap (percentage points; fractions ×100)."""
    lines = ["| row | metric | paper | ours | gap (points) | source | hand |", "|---|---|---|---|---|---|---|"]
    for row, ref in zip(rep.published, refs):
        ours = _fmt(ref["ours"], row["unit"]) if row["protocol"] else "unmeasured"
        if not ref["comparable"]:
            gap = "n/a (other setting)"
        else:
            gap = "-" if ref["gap_points"] is None else f"{ref['gap_points']:+.2f}"
        lines.append(
            f"| {row['id']} | {row['metric']} | {_fmt(row['value'], row['unit'], 'not retrieved')} | {ours} | {gap} | "
            f"{row['source']} | {row['hand']} |"
        )
    return "\n".join(lines) + "\n"


def list_table() -> str:
    """Every config: dataset, mode, protocols, the paper's number(s), expected GPU-hours."""
    lines = ["| config | dataset | mode | protocols | paper | GPU-hours (est.) |", "|---|---|---|---|---|---|"]
    for name in config_names():
        rep = load_reproduction(name)
        rows = [r for r in rep.published if r.get("comparable", True)]
        context = "" if rows else "context only (other dataset/model): "
        paper = context + "; ".join(
            f"{r['id']}: {_fmt(r['value'], r['unit'], 'not retrieved')}"
            f"{'' if r['unit'] == 'fraction' or r['value'] is None else ' ' + r['unit']}"
            f"{' [2nd-hand]' if r['hand'] == 'second-hand' else ''}"
            for r in rows or rep.published
        )
        mode = f"eval-only ({rep.checkpoint['kind']})" if rep.eval_only else "pretrain + eval"
        lines.append(
            f"| {name} | {rep.dataset} | {mode} | {', '.join(rep.protocols)} | {paper} | "
            f"{rep.compute['gpu_hours']} ({rep.compute['gpu']}) |"
        )
    return "\n".join(lines) + "\n"
