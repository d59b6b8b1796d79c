"""The ``diffssl`` command: ``pretrain``, ``eval``, ``bench``, ``leaderboard``, ``export``, ``reproduce``.

``diffssl bench`` with no arguments is the main job (Fashion-MNIST on the CPU, under 20 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

from . import cli_args as A
from .errors import DiffSSLError, UsageError, exit_code
from .loading import load_backbone
from .runtime import add_runtime_arguments

_HELP = argparse.ArgumentDefaultsHelpFormatter

#: ``diffssl eval --checkpoint-kind``: an export, or a key of ``checkpoints.CHECKPOINT_KINDS`` (listed here so that
#: parsing does not import diffusers; a test keeps the two in step)
CHECKPOINT_KIND_CHOICES = ("export", "diffusers_ddpm", "adm", "mdsm", "ddae_ddpm")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit code 2) that points at ``--help`` instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error (default: one line)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``diffssl`` argument parser: every option has help text and its default shown."""
    parser = _Parser(prog="diffssl", description=__doc__.splitlines()[0], formatter_class=_HELP)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.subcommands = {}

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_HELP)
        parser.subcommands[name] = p
        _common(p)
        return p

    p = add("pretrain", "pretrain one learner under a budget")
    p.add_argument("--config", default=None, help="YAML file of options (keys = option names; flags override it)")
    p.add_argument("--method", default="ddae", help="registered method name (see `diffssl pretrain --list`)")
    p.add_argument("--list", action="store_true", help="list the registered methods and exit")
    p.add_argument("--dataset", default="fashion_mnist", help="dataset name (see diffssl_plugin.data.DATASETS)")
    p.add_argument("--data-root", default=None, help="folder with the dataset files (else the installed copy)")
    p.add_argument("--budget", type=A.budget, default="4min", help="e.g. 4min, 90s, 2e13flops, 500steps")
    p.add_argument("--batch-size", type=A.positive_int, default=128, help="global batch size")
    p.add_argument(
        "--accumulate-grad-batches",
        type=A.positive_int,
        default=1,
        help="optimizer step every N batches (Lightning's accumulate_grad_batches)",
    )
    p.add_argument("--sync-batchnorm", action="store_true", help="synchronise BatchNorm statistics across processes")
    p.add_argument("--logger", default="csv", choices=A.LOGGERS, help="training logger (files under OUT/logs)")
    p.add_argument("--out", default="runs/pretrain", help="output folder (checkpoints, logs, export)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT has a checkpoint")
    p.add_argument("--seed", type=A.non_negative_int, default=0, help="random seed (data order, init, noise)")
    p.add_argument("--max-images", type=A.positive_int, default=None, help="pretrain on a class-balanced subset")
    p.add_argument("--method-args", type=A.json_dict, default="{}", help="JSON dict of extra method arguments")
    add_runtime_arguments(p)

    p = add("eval", "evaluate a backbone with the harness (linear probe, kNN, sweep)")
    p.add_argument("--config", default=None, help="YAML file of options (keys = option names; flags override it)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="an export folder (from pretrain/export) or its backbone/ folder")
    src.add_argument("--model", help="a timm model name (after `import diffssl_plugin`), e.g. raw_pixels")
    p.add_argument(
        "--checkpoint-kind",
        default="export",
        choices=CHECKPOINT_KIND_CHOICES,
        help="what --checkpoint is: export, or an official checkpoint kind (diffssl_plugin.checkpoints)",
    )
    p.add_argument("--weights", default=None, help="weights file for --model (safetensors or weights-only)")
    p.add_argument("--method", default=None, help="name for the records (default: from the checkpoint)")
    p.add_argument("--dataset", default="fashion_mnist", help="dataset name (see diffssl_plugin.data.DATASETS)")
    p.add_argument("--data-root", default=None, help="folder with the dataset files (else the installed copy)")
    p.add_argument("--timesteps", type=A.int_list, default=None, help="comma-separated sweep timesteps, e.g. 0,10,50")
    p.add_argument("--blocks", type=A.str_list, default=None, help="comma-separated sweep blocks, e.g. mid,up0")
    p.add_argument("--pools", type=A.pool_list, default=None, help="comma-separated poolings, e.g. avg,avg2x2")
    p.add_argument(
        "--protocol",
        type=A.str_list,
        default="linear",
        help="comma-separated protocols (see diffssl_plugin.eval.PROTOCOLS)",
    )
    p.add_argument("--train-images", type=A.count_or_all, default=10000, help="class-balanced train subset (or all)")
    p.add_argument("--val-images", type=A.count_or_all, default=5000, help="class-balanced validation subset (or all)")
    p.add_argument("--test-images", type=A.count_or_all, default=None, help="class-balanced test subset (None: all)")
    p.add_argument(
        "--extra",
        type=A.json_dict,
        default={},
        help='JSON dict of protocol settings (EvalConfig.extra), e.g. \'{"semisup": {"seeds": [0, 1, 2]}}\'',
    )
    p.add_argument("--out", default="runs/eval", help="output folder (records, leaderboard, feature cache)")
    add_runtime_arguments(p)

    p = add("bench", "the main job: pretrain all learners, evaluate, print a leaderboard")
    p.add_argument(
        "--preset",
        default="default",
        help="default (every learner and evaluation, under 20 min on 2 CPU cores), heads (DDAE with "
        "GAP-linear, attention, DifFormer, DifFeed), smoke (the same code path in about 3 min), or curve "
        "(learning curves: each learner evaluated at 1, 3 and 10 min of one run; --budget sets the last point)",
    )
    p.add_argument("--dataset", default=None, help="dataset name (default: the preset's)")
    p.add_argument("--data-root", default=None, help="folder with the dataset files (else the installed copy)")
    p.add_argument("--budget", type=A.budget, default=None, help="per-learner budget (default: the preset's)")
    p.add_argument("--methods", type=A.str_list, default=None, help="comma-separated learners (default: the preset's)")
    p.add_argument("--out", default="runs/bench", help="output folder")
    p.add_argument("--no-resume", action="store_true", help="start every learner over")
    add_runtime_arguments(p)

    p = add("leaderboard", "render Markdown and CSV from a records file")
    p.add_argument("records", help="records.jsonl")
    p.add_argument("--dataset", default=None, help="only records evaluated on this dataset (default: all)")
    p.add_argument("--out", default=None, help="folder for leaderboard.md/.csv (default: beside the records)")

    p = add("export", "turn a Lightning checkpoint into backbone safetensors (+ diffusers folder)")
    p.add_argument("checkpoint", help="a .ckpt written by `diffssl pretrain`")
    p.add_argument("out", help="export folder")
    p.add_argument("--method", default="ddae", help="the learner that wrote the checkpoint")

    p = add("reproduce", "run a published-result config: paper vs ours")
    from .reproduce import add_arguments as add_reproduce_arguments

    add_reproduce_arguments(p)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; with ``--config FILE``, the file's options go first so that flags override them."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        sub = parser.subcommands[args.command]
        at = argv.index(args.command)
        tokens = A.config_tokens(args.config, sub, argv[at + 1 :])
        args = parser.parse_args([*argv[: at + 1], *tokens, *argv[at + 1 :]])
    return args


def check_args(args: argparse.Namespace) -> None:
    """The checks argparse cannot make alone: names against the registries (listing the valid ones), required
    options that a config file may give, and option combinations."""
    command = args.command
    if command == "pretrain" and not args.list:
        A.check_names("method", [args.method], A.method_names())
        A.make_logger(args.logger, None)  # only checks that its package is installed
    if command == "export":
        A.check_names("method", [args.method], A.method_names())
    if command in ("pretrain", "eval") or (command == "bench" and args.dataset):
        A.check_names("dataset", [args.dataset], A.dataset_names())
    if command == "eval":
        if not (args.checkpoint or args.model):
            raise UsageError("name what to evaluate: --checkpoint EXPORT_FOLDER or --model TIMM_NAME")
        if args.checkpoint_kind != "export" and not args.checkpoint:
            raise UsageError("--checkpoint-kind goes with --checkpoint")
        if args.weights and not args.model:
            raise UsageError("--weights goes with --model (an export folder carries its own weights)")
        A.check_names("protocol", args.protocol, A.protocol_names())
        if args.model:
            A.check_model_name(args.model)
    if command == "bench":
        from .bench import PRESETS

        A.check_names("bench preset", [args.preset], sorted(PRESETS))
        A.check_names("method", args.methods or (), A.method_names())


def cmd_pretrain(args) -> int:
    from .methods import METHODS, load_entry_point_methods
    from .methods.training import pretrain

    if args.list:
        load_entry_point_methods()
        print("\n".join(sorted(METHODS)))
        return 0
    kwargs = {}
    if args.accumulate_grad_batches != 1:  # only then: pretrain() gained the parameter in issue 17
        kwargs["accumulate_grad_batches"] = args.accumulate_grad_batches
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
        method_kwargs=args.method_args,
        max_images=args.max_images,
        logger=A.make_logger(args.logger, args.out),
        **kwargs,
    )
    print(json.dumps(result.as_record(), indent=2))
    return 0


def cmd_eval(args) -> int:
    from .eval import EvalConfig, evaluate, write_leaderboard, write_records
    from .loading import read_pretrain_info
    from .methods.training import budget_spent
    from .runtime import current

    if args.checkpoint and args.checkpoint_kind != "export":
        from .loading import load_checkpoint_backbone

        backbone = load_checkpoint_backbone(args.checkpoint, args.checkpoint_kind)
    else:
        backbone = load_backbone(args.checkpoint, args.model, args.weights)
    A.check_readouts(backbone, args.blocks, args.timesteps, args.pools)
    kind = args.checkpoint_kind if args.checkpoint and args.checkpoint_kind != "export" else None
    name = backbone.pretrained_cfg.get("architecture") or args.model or kind or "backbone"
    config = EvalConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        train_images=args.train_images,
        val_images=args.val_images,
        test_images=args.test_images,
        extra=args.extra,
    )
    for field_name in ("timesteps", "blocks", "pools"):
        if getattr(args, field_name):
            setattr(config, field_name, getattr(args, field_name))
    out = Path(args.out)
    info = read_pretrain_info(args.checkpoint) if args.checkpoint else None  # an export says what it cost
    records = evaluate(
        backbone,
        args.method or (info or {}).get("method") or name,
        name,
        config,
        protocols=args.protocol,
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
    from .bench import PRESETS, run_bench

    markdown, _ = run_bench(
        args.preset,
        args.out,
        dataset=args.dataset,
        budget=args.budget,
        methods=args.methods,
        data_root=args.data_root,
        progress=not args.no_progress,
        resume=not args.no_resume,
    )
    print(markdown)
    made = "curve.md, curve.png" if PRESETS[args.preset].curve_points else "leaderboard, heatmaps and samples"
    print(f"records, {made} in {args.out}/")
    return 0


def cmd_leaderboard(args) -> int:
    from .errors import FileFormatError
    from .eval import read_records, write_leaderboard
    from .eval.leaderboard import leaderboard_rows
    from .eval.records import record_problem

    records = read_records(args.records, check=record_problem)
    if not records:
        raise FileFormatError(f"{args.records} holds no usable records")
    if not leaderboard_rows(records, args.dataset):
        found = sorted({(r.get("eval_config") or {}).get("dataset", r.get("dataset")) or "?" for r in records})
        wanted = f" on dataset {args.dataset!r}" if args.dataset else ""
        raise FileFormatError(
            f"{args.records} has no test-split records{wanted}; datasets with records: {', '.join(map(str, found))}"
        )
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


def _one_line_warning(command: str):
    """A ``warnings.showwarning`` that prints one line (a skipped records line, a rebuilt cache), like errors."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"diffssl {command}: warning: {message}", file=file or sys.stderr)

    return show


def main(argv: list[str] | None = None) -> int:
    """Run the ``diffssl`` command; return its exit code: 0 success, 1 runtime failure, 2 usage error.

    Expected failures print one line ``diffssl COMMAND: error: ...`` (``--debug``: the traceback)."""
    import dataclasses

    from . import runtime

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors of argparse exit with 2 and its usage line
    debug = getattr(args, "debug", False) or os.environ.get("DIFFSSL_DEBUG") == "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        args = _parse(parser, argv)
        check_args(args)
        rt = runtime.from_args(args)
        if rt is not None and getattr(args, "sync_batchnorm", False):
            rt = dataclasses.replace(rt, sync_batchnorm=True)
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _one_line_warning(args.command)
            if rt is None:
                return COMMANDS[args.command](args)
            with runtime.use(rt), _quiet_unless(rt.is_global_zero):  # starts the other processes, if any
                return COMMANDS[args.command](args)
    except (DiffSSLError, FileNotFoundError, PermissionError) as e:
        if debug:
            raise
        print(f"diffssl {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print(f"diffssl {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line and a pointer to --debug, not a wall of frames
        if debug:
            raise
        print(
            f"diffssl {args.command}: unexpected error: {type(e).__name__}: {_one_line(e)} "
            "(rerun with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
