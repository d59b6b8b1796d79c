"""The ``diffssl`` command: ``pretrain``, ``eval``, ``bench``, ``leaderboard``, ``export``, ``reproduce``.

``diffssl bench`` with no arguments is the main job (Fashion-MNIST on the CPU, under 20 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from .errors import DiffSSLError
from .loading import load_backbone
from .runtime import add_runtime_arguments


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _budget(text: str):
    from .methods.training import Budget

    try:
        return Budget.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffssl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain one learner under a budget")
    p.add_argument("--method", default="ddae", help="registered method name (see `diffssl pretrain --list`)")
    p.add_argument("--list", action="store_true", help="list the registered methods and exit")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-root", default=None, help="folder with the dataset files (else the installed copy)")
    p.add_argument("--budget", type=_budget, default="4min", help="e.g. 4min, 90s, 2e13flops, 500steps")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size")
    p.add_argument("--out", default="runs/pretrain")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT has a checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-images", type=int, default=None, help="pretrain on a class-balanced subset")
    p.add_argument("--method-args", default="{}", help="JSON dict of extra method arguments")
    add_runtime_arguments(p)

    p = sub.add_parser("eval", help="evaluate a backbone with the harness (linear probe, kNN, sweep)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="an export folder (from pretrain/export) or its backbone/ folder")
    src.add_argument("--model", help="a timm model name (after `import diffssl_plugin`), e.g. raw_pixels")
    p.add_argument("--weights", default=None, help="weights file for --model (safetensors or weights-only)")
    p.add_argument("--method", default=None, help="name for the records (default: from the checkpoint)")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--timesteps", default=None, help="comma-separated sweep timesteps, e.g. 0,10,50")
    p.add_argument("--blocks", default=None, help="comma-separated sweep blocks, e.g. mid,up0")
    p.add_argument("--pools", default=None, help="comma-separated poolings, e.g. avg,avg2x2")
    p.add_argument(
        "--protocol",
        default="linear",
        help="comma-separated protocols (see diffssl_plugin.eval.PROTOCOLS); default: linear",
    )
    p.add_argument("--train-images", type=int, default=10000, help="class-balanced train subset")
    p.add_argument("--val-images", type=int, default=5000, help="class-balanced validation subset")
    p.add_argument("--test-images", type=int, default=None, help="class-balanced test subset (default: all)")
    p.add_argument(
        "--extra",
        type=_json_dict,
        default={},
        help='JSON dict of protocol settings (EvalConfig.extra), e.g. \'{"semisup": {"seeds": [0, 1, 2]}}\'',
    )
    p.add_argument("--out", default="runs/eval")
    add_runtime_arguments(p)

    p = sub.add_parser("bench", help="the main job: pretrain all learners, evaluate, print a leaderboard")
    p.add_argument(
        "--preset",
        default="default",
        help="default (every learner and evaluation, under 20 min on 2 CPU cores), heads (DDAE with "
        "GAP-linear, attention, DifFormer, DifFeed), or smoke (the same code path in about 3 min)",
    )
    p.add_argument("--dataset", default=None)
    p.add_argument("--data-root", default=None)
    p.add_argument("--budget", type=_budget, default=None, help="per-learner budget (default: the preset's)")
    p.add_argument("--methods", default=None, help="comma-separated learners (default: the preset's)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--no-resume", action="store_true")
    add_runtime_arguments(p)

    p = sub.add_parser("leaderboard", help="render Markdown and CSV from a records file")
    p.add_argument("records", help="records.jsonl")
    p.add_argument("--dataset", default=None)
    p.add_argument("--out", default=None, help="folder for leaderboard.md/.csv (default: beside the records)")

    p = sub.add_parser("export", help="turn a Lightning checkpoint into backbone safetensors (+ diffusers folder)")
    p.add_argument("checkpoint", help="a .ckpt written by `diffssl pretrain`")
    p.add_argument("out", help="export folder")
    p.add_argument("--method", default="ddae")

    p = sub.add_parser("reproduce", help="run a published-result config: paper vs ours")
    from .reproduce import add_arguments as add_reproduce_arguments

    add_reproduce_arguments(p)
    return parser


def _split(text: str | None, cast=str):
    return tuple(cast(t) for t in text.split(",") if t) if text else None


def cmd_pretrain(args) -> int:
    from .methods import METHODS, load_entry_point_methods
    from .methods.training import pretrain

    if args.list:
        load_entry_point_methods()
        print("\n".join(sorted(METHODS)))
        return 0
    result = pretrain(
        args.method,
        args.dataset,
        args.budget,
        args.out,
        batch_size=args.batch_size,
        data_root=args.data_root,
        resume=not args.no_resume,
        progress=not args.no_progress,
        seed=args.seed,
        method_kwargs=json.loads(args.method_args),
        max_images=args.max_images,
    )
    print(json.dumps(result.as_record(), indent=2))
    return 0


def cmd_eval(args) -> int:
    from .eval import EvalConfig, evaluate, write_leaderboard, write_records
    from .loading import read_pretrain_info
    from .methods.training import budget_spent
    from .runtime import current

    backbone = load_backbone(args.checkpoint, args.model, args.weights)
    name = backbone.pretrained_cfg.get("architecture") or args.model or "backbone"
    config = EvalConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        train_images=args.train_images,
        val_images=args.val_images,
        test_images=args.test_images,
        extra=args.extra,
    )
    for field_name, text, cast in (
        ("timesteps", args.timesteps, int),
        ("blocks", args.blocks, str),
        ("pools", args.pools, str),
    ):
        if text:
            setattr(config, field_name, _split(text, cast))
    out = Path(args.out)
    info = read_pretrain_info(args.checkpoint) if args.checkpoint else None  # an export says what it cost
    records = evaluate(
        backbone,
        args.method or (info or {}).get("method") or name,
        name,
        config,
        protocols=_split(args.protocol),
        budget=budget_spent(info) if info else None,
        cache_dir=out / "feature_cache",
        out_dir=out,
        progress=not args.no_progress,
    )
    if current().is_global_zero:  # every rank holds the same records; one writes them
        write_records(out / "records.jsonl", records)
        print(write_leaderboard(records, out, dataset=args.dataset))
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    markdown, _ = run_bench(
        args.preset,
        args.out,
        dataset=args.dataset,
        budget=args.budget,
        methods=_split(args.methods),
        data_root=args.data_root,
        progress=not args.no_progress,
        resume=not args.no_resume,
    )
    print(markdown)
    print(f"records, leaderboard, heatmaps and samples in {args.out}/")
    return 0


def cmd_leaderboard(args) -> int:
    from .eval import read_records, write_leaderboard

    records = read_records(args.records)
    print(write_leaderboard(records, args.out or Path(args.records).parent, dataset=args.dataset))
    return 0


def cmd_export(args) -> int:
    from .loading import export, load_learner_checkpoint
    from .methods import get_method

    model = load_learner_checkpoint(get_method(args.method)["model"], args.checkpoint, args.method)
    print(export(model, args.out))
    return 0


def cmd_reproduce(args) -> int:
    from .reproduce import run_cli

    return run_cli(args)


@contextlib.contextmanager
def _quiet_unless(loud: bool):
    """Standard output of the other ranks goes nowhere: one report per run (errors still reach stderr)."""
    if loud:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


COMMANDS = {
    "pretrain": cmd_pretrain,
    "eval": cmd_eval,
    "bench": cmd_bench,
    "leaderboard": cmd_leaderboard,
    "export": cmd_export,
    "reproduce": cmd_reproduce,
}


def main(argv: list[str] | None = None) -> int:
    from . import runtime

    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        rt = runtime.from_args(args)
        if rt is None:
            return COMMANDS[args.command](args)
        with runtime.use(rt), _quiet_unless(rt.is_global_zero):  # starts the other processes, if any
            return COMMANDS[args.command](args)
    except (DiffSSLError, FileNotFoundError) as e:
        print(f"diffssl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
