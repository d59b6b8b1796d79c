"""``diffssl reproduce NAME``: run a published-result config (``diffssl_plugin/configs``) against the paper.

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

A config with ``method`` pretrains with :func:`~diffssl_plugin.methods.training.pretrain` and then evaluates
the exported backbone; with ``--checkpoint PATH`` (and ``--checkpoint-kind``) it only evaluates. Records carry
a ``reference`` field (the published row, its source and the gap) and go through the usual records and
leaderboard files.

``--dry-run`` builds everything (model at the config's architecture, optimiser, data pipeline, eval config)
and runs one training step and one evaluation pass (feature extraction, probes, one head epoch) on a tiny
batch on the CPU. It uses a few images of the config's dataset when the dataset is installed, else synthetic
images of its shape, and says which.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .errors import InputError, UnknownNameError

#: keys a reproduction config adds to the reference-config keys (all of them are read here)
PUBLISHED_KEYS = {"id", "value", "unit", "metric", "protocol", "source", "hand", "tag", "dataset", "comparable",
                  "eval", "note"}
PUBLISHED_REQUIRED = {"id", "value", "unit", "metric", "protocol", "source", "hand"}
COMPUTE_KEYS = {"gpu_hours", "gpu", "basis", "pretrain_gpu_hours", "eval_gpu_hours", "published_runtime"}
CHECKPOINT_KEYS = {"kind", "file", "url", "method", "backbone", "settings", "note"}
DRY_RUN_KEYS = {"scale", "unet_overrides", "method_kwargs", "note"}
UNITS = ("%", "fraction", "FID", "IS")
HANDS = ("first-hand", "second-hand")

#: shape facts of the standard datasets, used when a dataset is not registered (yet) on this machine:
#: (channels, image size the configs use, classes, training images)
DATASET_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "cifar10": (3, 32, 10, 50_000), "cifar100": (3, 32, 100, 50_000), "stl10": (3, 96, 10, 105_000),
    "tiny_imagenet": (3, 64, 200, 100_000), "imagenet": (3, 256, 1000, 1_281_167),
    "imagenet_1pct": (3, 256, 1000, 12_811), "imagenet_10pct": (3, 256, 1000, 128_116),
    "fashion_mnist": (1, 28, 10, 60_000),
}


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
            raise InputError(f"{path}: missing key {key!r}: a reproduction config needs 'published', 'eval' "
                             "and 'compute'")
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
            check_name("protocol", row["protocol"].split(":")[0], list(PROTOCOLS) + ["knn20", "knn200"])
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
    return Reproduction(Path(path).stem, Path(path), raw, published, protocols, eval_fields, raw["compute"],
                        checkpoint, dry_run)


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
    return {"config": rep.name, "row": row["id"], "published": row["value"], "unit": row["unit"],
            "metric": row["metric"], "source": row["source"], "hand": row["hand"], "tag": row.get("tag"),
            "comparable": row.get("comparable", True), "ours": ours,
            "gap_points": gap, "dry_run": dry_run}


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
        lines.append(f"| {row['id']} | {row['metric']} | {_fmt(row['value'], row['unit'], 'not retrieved')} | {ours} | {gap} | "
                     f"{row['source']} | {row['hand']} |")
    return "\n".join(lines) + "\n"


def list_table() -> str:
    """Every config: dataset, mode, protocols, the paper's number(s), expected GPU-hours."""
    lines = ["| config | dataset | mode | protocols | paper | GPU-hours (est.) |", "|---|---|---|---|---|---|"]
    for name in config_names():
        rep = load_reproduction(name)
        rows = [r for r in rep.published if r.get("comparable", True)]
        context = "" if rows else "context only (other dataset/model): "
        paper = context + "; ".join(f"{r['id']}: {_fmt(r['value'], r['unit'], 'not retrieved')}"
                          f"{'' if r['unit'] == 'fraction' or r['value'] is None else ' ' + r['unit']}"
                          f"{' [2nd-hand]' if r['hand'] == 'second-hand' else ''}" for r in rows or rep.published)
        mode = f"eval-only ({rep.checkpoint['kind']})" if rep.eval_only else "pretrain + eval"
        lines.append(f"| {name} | {rep.dataset} | {mode} | {', '.join(rep.protocols)} | {paper} | "
                     f"{rep.compute['gpu_hours']} ({rep.compute['gpu']}) |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- data
def dataset_shape(name: str, root: str | None = None) -> tuple[int, int, int, int]:
    """(channels, image size, classes, training images) of a dataset: from the registry when it is there,
    else from :data:`DATASET_SHAPES`."""
    from .data import DATASETS

    if name in DATASETS:
        spec = DATASETS[name]
        train = DATASET_SHAPES.get(name, (0, 0, 0, 0))[3]
        return spec.channels, spec.image_size, spec.num_classes, train
    if name not in DATASET_SHAPES:
        raise UnknownNameError("dataset", name, sorted(set(DATASETS) | set(DATASET_SHAPES)))
    return DATASET_SHAPES[name]


def tiny_dataset(name: str, root: str | None, images: int = 8, seed: int = 0) -> tuple[str, str]:
    """Register ``dryrun-<name>``: ``images`` images of ``name`` (a few real ones when the dataset loads, else
    synthetic uniform noise of its shape), labels cycling over 4 classes, half of each class held out for
    validation, and as many test images. Returns (registered name, "real"/"synthetic")."""
    import numpy as np

    from .data import DATASETS
    from .data.registry import DatasetSpec, register_dataset

    channels, size, num_classes, _ = dataset_shape(name, root)
    kind, x = "synthetic", None
    if name in DATASETS:
        from .data import load_split
        from .errors import DiffSSLError

        try:
            test = load_split(name, "test", root=root, download=False)
            x = test.images[: 2 * images].numpy()
            kind = "real"
        except (DiffSSLError, FileNotFoundError, OSError):
            x = None
    rng = np.random.default_rng(seed)
    if x is None or len(x) < 2 * images:
        x = rng.integers(0, 256, size=(2 * images, channels, size, size), dtype=np.uint8)
        kind = "synthetic"
    y = np.arange(2 * images) % min(4, num_classes)
    arrays = (x[:images], y[:images].astype(np.int64), x[images:], y[images:].astype(np.int64))
    tiny = f"dryrun-{name}"
    # registered sets whose names come from the data files (ImageFolder trees) have no class names yet
    classes = (DATASETS[name].class_names if name in DATASETS else ()) or tuple(str(i) for i in range(num_classes))
    from .data.registry import _load_arrays

    register_dataset(DatasetSpec(tiny, lambda root=None, download=False: arrays, classes, channels, size,
                                 f"dry-run stand-in for {name} ({kind} images)", val_fraction=0.5))
    _load_arrays.cache_clear()
    return tiny, kind


# ---------------------------------------------------------------------------------------------- backbones
def build_config_backbone(rep: Reproduction, full_scale: bool = False):
    """The backbone an eval-only config evaluates, built from its ``checkpoint.backbone`` architecture without
    weights (for dry runs); ``dry_run.unet_overrides`` shrink it unless ``full_scale``."""
    from .backbones.ddae import DDAEBackbone

    spec = dict((rep.checkpoint or {}).get("backbone") or {})
    if spec.get("type", "ddae_unet") != "ddae_unet":
        raise InputError(f"{rep.name}: checkpoint.backbone.type {spec.get('type')!r} is not supported; "
                         "valid: ddae_unet")
    unet = dict(spec.get("unet_config") or {})
    if not full_scale:
        unet.update(rep.dry_run.get("unet_overrides") or {})
    unet = {k: tuple(v) if isinstance(v, list) else v for k, v in unet.items()}
    settings = dict((rep.checkpoint or {}).get("settings") or {})
    return DDAEBackbone(unet_config=unet, scheduler_config=spec.get("scheduler_config"), **settings)


# ---------------------------------------------------------------------------------------------- running
@dataclass
class RunOptions:
    """Command-line options of one reproduction."""

    out: Path
    data_root: str | None = None
    checkpoint: str | None = None
    checkpoint_kind: str | None = None
    progress: bool = True
    dry_run: bool = False
    full_scale: bool = False


def _runtime(options: RunOptions):
    """The hardware of a run: the command's (:func:`diffssl_plugin.runtime.current`), or, for a dry run, this
    one process on the CPU."""
    from .runtime import Runtime, current

    return Runtime(accelerator="cpu") if options.dry_run else current()


def _dry_eval_config(rep: Reproduction, dataset: str):
    """The config's evaluation settings on the tiny stand-in: the real readouts, protocols and head sizes,
    with every split whole, one C, one kNN k, and one head epoch on batches of 4."""
    config = eval_config(rep)
    extra = {k: dict(v) for k, v in (config.extra or {}).items()}
    for name in ("attention", "difformer", "diffeed"):
        if name in rep.protocols:
            e = extra.setdefault(name, {})
            e.update(train_images=None, val_images=None)
            e["training_kwargs"] = {**e.get("training_kwargs", {}), "epochs": 1, "batch_size": 4, "eval_every": 1}
    if "finetune" in rep.protocols:
        extra.setdefault("finetune", {}).update(epochs=1, batch_size=4, train_images=None)
    return replace(config, dataset=dataset, data_root=None, train_images=None, val_images=None,
                   test_images=None, batch_size=4, sweep_cs=(1.0,), final_cs=(1.0,), extra=extra)


def reproduce(name: str, options: RunOptions) -> tuple[str, list[dict]]:
    """Run config ``name`` (see the module docstring); return (printed report, records)."""
    from .eval import evaluate, write_leaderboard, write_records
    from .loading import load_checkpoint_backbone

    rep = load_reproduction(name)
    lines = [f"# {rep.name}: {rep.title}"]
    started = time.perf_counter()
    budget = None
    checkpoint_hash = None
    data_note = None
    if options.dry_run:
        dataset, kind = tiny_dataset(rep.dataset, options.data_root)
        data_note = (f"dry run on {kind} images of {rep.dataset}'s shape "
                     f"{'(the dataset is not installed here)' if kind == 'synthetic' else '(a few real images)'}")
        lines.append(data_note)
    else:
        dataset = rep.dataset
    rt = _runtime(options)
    device = str(rt.device)

    if options.checkpoint:
        ck = rep.checkpoint or {}
        backbone = load_checkpoint_backbone(options.checkpoint, options.checkpoint_kind, device,
                                            default_kind=ck.get("kind"), settings=ck.get("settings"))
        checkpoint_hash = _path_hash(options.checkpoint)
        lines.append(f"evaluating checkpoint {options.checkpoint}")
    elif rep.eval_only:
        if not options.dry_run:
            ck = rep.checkpoint
            raise InputError(f"{rep.name} is eval-only: pass --checkpoint PATH to {ck['file']} "
                             f"({ck.get('url', 'see the config')}); kind {ck['kind']!r}")
        backbone = build_config_backbone(rep, options.full_scale)
        scale = "full scale" if options.full_scale or not rep.dry_run.get("unet_overrides") else "dry-run scale"
        lines.append(f"backbone built without weights at {scale}: "
                     f"{sum(p.numel() for p in backbone.parameters()) / 1e6:.1f}M parameters"
                     + (f" ({sum_params_note(rep)})" if scale == "dry-run scale" else ""))
    else:
        backbone, budget, checkpoint_hash, note = _pretrain(rep, dataset, options)
        lines.append(note)

    records: list[dict] = []
    refs: list[dict | None] = [None] * len(rep.published)
    groups = row_groups(rep)[:1] if options.dry_run else row_groups(rep)
    for overrides, rows in groups:
        config = _dry_eval_config(rep, dataset) if options.dry_run else eval_config(rep, overrides,
                                                                                     data_root=options.data_root)
        got = evaluate(backbone, rep.method_name(), rep.name, config, protocols=rep.protocols, budget=budget,
                       checkpoint_hash=checkpoint_hash, cache_dir=None if options.dry_run else
                       options.out / "feature_cache", out_dir=options.out, device=device,
                       progress=options.progress, runtime=rt)
        for row in rows:
            i = rep.published.index(row)
            ours = record_value(row, got)
            refs[i] = reference_field(rep, row, ours, options.dry_run)
            for r in got:
                if r.get("split") == "test" and r["protocol"]["name"] == row["protocol"]:
                    r.setdefault("reference", []).append(refs[i])
        for r in got:
            r["reproduction"] = {"config": rep.name, "eval_overrides": overrides, "dry_run": options.dry_run,
                                 "data": data_note or "real"}
        records += got
    for i, row in enumerate(rep.published):  # rows the dry run skipped, or that nothing measures
        if refs[i] is None:
            refs[i] = reference_field(rep, row, None, options.dry_run)
    lines.append(comparison_table(rep, refs))
    if options.dry_run:
        lines.append("(dry run: the 'ours' column comes from a tiny untrained or one-step model on "
                     f"{'synthetic' if 'synthetic' in (data_note or '') else 'a few'} images, not a result)")
    if rt.is_global_zero:  # every rank holds the same records; one writes them
        write_records(options.out / "records.jsonl", records)
        lines.append(write_leaderboard(records, options.out))
    lines.append(f"records and leaderboard in {options.out}/ ({time.perf_counter() - started:.1f} s)")
    return "\n".join(lines), records


def sum_params_note(rep: Reproduction) -> str:
    """What the dry-run scale leaves out (the config's ``dry_run.note``)."""
    return (rep.dry_run.get("note") or "the real model is larger; build it with --full-scale").strip()


def _path_hash(path: str) -> str | None:
    from .io import file_sha256

    p = Path(path)
    if p.is_file():
        return file_sha256(p)[:16]
    return None


def _merged(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied, nested mappings merged key by key."""
    out = dict(base)
    for k, v in changes.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _pretrain(rep: Reproduction, dataset: str, options: RunOptions):
    """Pretrain with the config's settings (one step of batch 2 on the tiny set for a dry run) and return
    (backbone, budget spent, checkpoint hash, note), on every rank."""
    from .io import file_sha256
    from .loading import load_backbone
    from .methods.reference_configs import pretrain_kwargs
    from .methods.training import Budget, budget_spent, pretrain

    common = dict(out_dir=str(options.out / "pretrain"), data_root=options.data_root, runtime=_runtime(options),
                  progress=options.progress)
    if options.dry_run:
        common.update(dataset=dataset, max_images=4, batch_size=2, budget=Budget(steps=1), data_root=None,
                      checkpoint_every=10 ** 9)
    raw, scale = rep.raw, "full scale"
    if options.dry_run and not options.full_scale and rep.dry_run.get("method_kwargs"):
        raw, scale = {**rep.raw, "method_kwargs": _merged(rep.raw.get("method_kwargs") or {},
                                                          rep.dry_run["method_kwargs"])}, "dry-run scale"
    kwargs = pretrain_kwargs(raw, **common)
    result = pretrain(**kwargs)
    export_dir = Path(result.out_dir) / "export"
    backbone = load_backbone(checkpoint=export_dir)
    budget = budget_spent(result)
    _, _, _, train_images = dataset_shape(rep.dataset, options.data_root)
    full_flops = result.flops_per_image * train_images * float(rep.raw["epochs"])
    params = sum(p.numel() for p in backbone.parameters()) / 1e6
    note = (f"model at {scale} ({params:.1f}M backbone parameters"
            f"{'; ' + rep.dry_run['note'] if scale == 'dry-run scale' and rep.dry_run.get('note') else ''}); "
            f"pretrained {result.method} {result.steps} step(s) of batch {result.global_batch_size} in "
            f"{result.wall_seconds:.1f} s; training FLOPs per image {result.flops_per_image / 1e9:.2f} G "
            + (f"→ the config's {rep.raw['epochs']} epochs of {train_images} images ≈ {full_flops:.2e} FLOPs "
               if scale == "full scale" else "(of the reduced model) ")
            + f"(expected cost: {rep.compute['gpu_hours']} GPU-hours on {rep.compute['gpu']})")
    return backbone, budget, file_sha256(export_dir / "backbone")[:16], note


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``diffssl reproduce`` arguments (wired into :mod:`diffssl_plugin.cli`)."""
    p.add_argument("name", nargs="?", help="config name (see --list) or a YAML path")
    p.add_argument("--list", action="store_true", help="list the configs with paper numbers and GPU-hours")
    p.add_argument("--dry-run", action="store_true",
                   help="build everything and run one step on the CPU (synthetic images if no data)")
    p.add_argument("--full-scale", action="store_true",
                   help="dry run: build eval-only backbones at their real size (ADM-256: ~550M parameters)")
    p.add_argument("--checkpoint", default=None, help="evaluate this checkpoint only (no pretraining)")
    p.add_argument("--checkpoint-kind", default=None,
                   help="export (a `diffssl pretrain` export folder), diffusers_ddpm, adm or mdsm "
                        "(default: the config's)")
    p.add_argument("--data-root", default=None, help="folder with the dataset (see `diffssl_plugin.data`)")
    p.add_argument("--out", default=None, help="output folder (default runs/reproduce/NAME; dry run: a temp dir)")
    from .runtime import add_runtime_arguments

    add_runtime_arguments(p)


def run_cli(args: argparse.Namespace) -> int:
    """``diffssl reproduce``: dispatch of :func:`add_arguments`' options."""
    if args.list:
        print(list_table())
        return 0
    if not args.name:
        raise InputError(f"name a config (one of: {', '.join(config_names())}) or pass --list")
    with tempfile.TemporaryDirectory(prefix="diffssl-dryrun-") as tmp:
        default = Path(tmp) if args.dry_run else Path("runs/reproduce") / Path(args.name).stem
        options = RunOptions(out=Path(args.out) if args.out else default, data_root=args.data_root,
                             checkpoint=args.checkpoint, checkpoint_kind=args.checkpoint_kind,
                             progress=not args.no_progress, dry_run=args.dry_run,
                             full_scale=args.full_scale)
        report, _ = reproduce(args.name, options)
        print(report)
    return 0
