"""``diffssl reproduce NAME``: run one published-result config (:mod:`diffssl_plugin.published`: the format) and
compare with the paper.

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
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .data.dry_run import dataset_shape, tiny_dataset
from .errors import InputError
from .published import (
    Reproduction,
    comparison_table,
    config_names,
    eval_config,
    list_table,
    load_reproduction,
    record_value,
    reference_field,
    row_groups,
)


# ---------------------------------------------------------------------------------------------- backbones
def build_config_backbone(rep: Reproduction, full_scale: bool = False):
    """The backbone an eval-only config evaluates, built from its ``checkpoint.backbone`` architecture without
    weights (for dry runs); ``dry_run.unet_overrides`` shrink it unless ``full_scale``."""
    from .backbones.ddae import DDAEBackbone

    spec = dict((rep.checkpoint or {}).get("backbone") or {})
    if spec.get("type", "ddae_unet") != "ddae_unet":
        raise InputError(
            f"{rep.name}: checkpoint.backbone.type {spec.get('type')!r} is not supported; valid: ddae_unet"
        )
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
    return replace(
        config,
        dataset=dataset,
        data_root=None,
        train_images=None,
        val_images=None,
        test_images=None,
        batch_size=4,
        sweep_cs=(1.0,),
        final_cs=(1.0,),
        extra=extra,
    )


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
        data_note = (
            f"dry run on {kind} images of {rep.dataset}'s shape "
            f"{'(the dataset is not installed here)' if kind == 'synthetic' else '(a few real images)'}"
        )
        lines.append(data_note)
    else:
        dataset = rep.dataset
    rt = _runtime(options)
    device = str(rt.device)

    if options.checkpoint:
        ck = rep.checkpoint or {}
        backbone = load_checkpoint_backbone(
            options.checkpoint,
            options.checkpoint_kind,
            device,
            default_kind=ck.get("kind"),
            settings=ck.get("settings"),
        )
        checkpoint_hash = _path_hash(options.checkpoint)
        lines.append(f"evaluating checkpoint {options.checkpoint}")
    elif rep.eval_only:
        if not options.dry_run:
            ck = rep.checkpoint
            raise InputError(
                f"{rep.name} is eval-only: pass --checkpoint PATH to {ck['file']} "
                f"({ck.get('url', 'see the config')}); kind {ck['kind']!r}"
            )
        backbone = build_config_backbone(rep, options.full_scale)
        scale = "full scale" if options.full_scale or not rep.dry_run.get("unet_overrides") else "dry-run scale"
        lines.append(
            f"backbone built without weights at {scale}: "
            f"{sum(p.numel() for p in backbone.parameters()) / 1e6:.1f}M parameters"
            + (f" ({sum_params_note(rep)})" if scale == "dry-run scale" else "")
        )
    else:
        backbone, budget, checkpoint_hash, note = _pretrain(rep, dataset, options)
        lines.append(note)

    records: list[dict] = []
    refs: list[dict | None] = [None] * len(rep.published)
    groups = row_groups(rep)[:1] if options.dry_run else row_groups(rep)
    for overrides, rows in groups:
        config = (
            _dry_eval_config(rep, dataset)
            if options.dry_run
            else eval_config(rep, overrides, data_root=options.data_root)
        )
        got = evaluate(
            backbone,
            rep.method_name(),
            rep.name,
            config,
            protocols=rep.protocols,
            budget=budget,
            checkpoint_hash=checkpoint_hash,
            cache_dir=None if options.dry_run else options.out / "feature_cache",
            out_dir=options.out,
            device=device,
            progress=options.progress,
            runtime=rt,
        )
        for row in rows:
            i = rep.published.index(row)
            ours = record_value(row, got)
            refs[i] = reference_field(rep, row, ours, options.dry_run)
            for r in got:
                if r.get("split") == "test" and r["protocol"]["name"] == row["protocol"]:
                    r.setdefault("reference", []).append(refs[i])
        for r in got:
            r["reproduction"] = {
                "config": rep.name,
                "eval_overrides": overrides,
                "dry_run": options.dry_run,
                "data": data_note or "real",
            }
        records += got
    for i, row in enumerate(rep.published):  # rows the dry run skipped, or that nothing measures
        if refs[i] is None:
            refs[i] = reference_field(rep, row, None, options.dry_run)
    lines.append(comparison_table(rep, refs))
    if options.dry_run:
        lines.append(
            "(dry run: the 'ours' column comes from a tiny untrained or one-step model on "
            f"{'synthetic' if 'synthetic' in (data_note or '') else 'a few'} images, not a result)"
        )
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

    common = {
        "out_dir": str(options.out / "pretrain"),
        "data_root": options.data_root,
        "runtime": _runtime(options),
        "progress": options.progress,
    }
    if options.dry_run:
        common.update(
            dataset=dataset, max_images=4, batch_size=2, budget=Budget(steps=1), data_root=None, checkpoint_every=10**9
        )
    raw, scale = rep.raw, "full scale"
    if options.dry_run and not options.full_scale and rep.dry_run.get("method_kwargs"):
        raw, scale = (
            {**rep.raw, "method_kwargs": _merged(rep.raw.get("method_kwargs") or {}, rep.dry_run["method_kwargs"])},
            "dry-run scale",
        )
    kwargs = pretrain_kwargs(raw, **common)
    result = pretrain(**kwargs)
    export_dir = Path(result.out_dir) / "export"
    backbone = load_backbone(checkpoint=export_dir)
    budget = budget_spent(result)
    _, _, _, train_images = dataset_shape(rep.dataset, options.data_root)
    full_flops = result.flops_per_image * train_images * float(rep.raw["epochs"])
    params = sum(p.numel() for p in backbone.parameters()) / 1e6
    note = (
        f"model at {scale} ({params:.1f}M backbone parameters"
        f"{'; ' + rep.dry_run['note'] if scale == 'dry-run scale' and rep.dry_run.get('note') else ''}); "
        f"pretrained {result.method} {result.steps} step(s) of batch {result.global_batch_size} in "
        f"{result.wall_seconds:.1f} s; training FLOPs per image {result.flops_per_image / 1e9:.2f} G "
        + (
            f"→ the config's {rep.raw['epochs']} epochs of {train_images} images ≈ {full_flops:.2e} FLOPs "
            if scale == "full scale"
            else "(of the reduced model) "
        )
        + f"(expected cost: {rep.compute['gpu_hours']} GPU-hours on {rep.compute['gpu']})"
    )
    return backbone, budget, file_sha256(export_dir / "backbone")[:16], note


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``diffssl reproduce`` arguments (wired into :mod:`diffssl_plugin.cli`)."""
    p.add_argument("name", nargs="?", help="config name (see --list) or a YAML path")
    p.add_argument("--list", action="store_true", help="list the configs with paper numbers and GPU-hours")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build everything and run one step on the CPU (synthetic images if no data)",
    )
    p.add_argument(
        "--full-scale",
        action="store_true",
        help="dry run: build eval-only backbones at their real size (ADM-256: ~550M parameters)",
    )
    p.add_argument("--checkpoint", default=None, help="evaluate this checkpoint only (no pretraining)")
    p.add_argument(
        "--checkpoint-kind",
        default=None,
        choices=("export", "diffusers_ddpm", "adm", "mdsm"),
        help="export (a `diffssl pretrain` export folder), diffusers_ddpm, adm or mdsm (None: the config's)",
    )
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
        options = RunOptions(
            out=Path(args.out) if args.out else default,
            data_root=args.data_root,
            checkpoint=args.checkpoint,
            checkpoint_kind=args.checkpoint_kind,
            progress=not args.no_progress,
            dry_run=args.dry_run,
            full_scale=args.full_scale,
        )
        report, _ = reproduce(args.name, options)
        print(report)
    return 0
