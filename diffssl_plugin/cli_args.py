"""Argument checking for the ``diffssl`` command, where arguments are parsed: argparse ``type=`` functions
(positive counts, JSON objects, budgets, comma lists), name checks against the registries, and ``--config``
YAML files (keys are option names; command-line flags override the file).

Every check fails with one line naming the option, the value and what is valid (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import UnknownNameError, UsageError


# ---------------------------------------------------------------------------------------------- value types
def positive_int(text: str) -> int:
    """An integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (≥ 1), got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer ≥ 0 (seeds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value}")
    return value


def count_or_all(text: str) -> int | None:
    """A positive image count, or ``all`` (None: the whole split)."""
    if str(text).lower() in ("all", "none"):
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive number of images or 'all', got {text!r}") from None


def json_dict(text: str) -> dict:
    """A JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def budget(text: str):
    """A :class:`~diffssl_plugin.methods.training.Budget` with every limit positive."""
    from .methods.training import Budget

    try:
        value = Budget.parse(text)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    for unit in ("minutes", "flops", "steps"):
        limit = getattr(value, unit)
        if limit is not None and not limit > 0:
            raise argparse.ArgumentTypeError(f"a budget must be positive, got {text!r} ({unit} = {limit:g})")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated integers ≥ 0 (timesteps)."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    try:
        values = tuple(int(t) for t in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,10,50, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"timesteps must be ≥ 0, got {text!r}")
    return values


def str_list(text: str) -> tuple[str, ...]:
    """Comma-separated names (at least one)."""
    items = tuple(t.strip() for t in str(text).split(",") if t.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return items


def pool_list(text: str) -> tuple[str, ...]:
    """Comma-separated pooling names (``avg``, ``avgKxK``, ``none``)."""
    from .backbones.pooling import pool_cells

    pools = str_list(text)
    for pool in pools:
        try:
            pool_cells(pool)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return pools


# ---------------------------------------------------------------------------------------------- names
def check_names(kind: str, names: Sequence[str], valid: Sequence[str]) -> None:
    """Raise :class:`UnknownNameError` (listing ``valid``) for the first name not in ``valid``."""
    for name in names:
        if name not in valid:
            raise UnknownNameError(kind, name, valid)


def check_readouts(
    backbone, blocks: Sequence[str] | None, timesteps: Sequence[int] | None, pools: Sequence[str] | None
) -> None:
    """Explicit ``--blocks/--timesteps/--pools`` must exist in ``backbone``: an error lists what it has, and
    nothing is silently replaced."""
    name = backbone.pretrained_cfg.get("architecture") or type(backbone).__name__
    asked = [o for o, v in (("--blocks", blocks), ("--timesteps", timesteps)) if v]
    if not hasattr(backbone, "extract"):
        if asked or pools:
            raise UsageError(
                f"{name} is read at its pooled output only: it has no blocks, timesteps or poolings to choose "
                f"(drop {', '.join(asked + (['--pools'] if pools else []))})"
            )
        return
    if blocks:
        check_names(f"block of {name}", blocks, list(backbone.block_names))
    steps = getattr(backbone, "num_train_timesteps", None)
    for t in timesteps or ():
        if steps is None and t != 0:
            raise UsageError(f"{name} has no diffusion timesteps; use --timesteps 0 (or leave it out)")
        if steps is not None and not 0 <= t < steps:
            raise UsageError(f"timestep {t} is not one of {name}'s timesteps 0..{steps - 1}")


def method_names() -> list[str]:
    from .methods import METHODS, load_entry_point_methods

    load_entry_point_methods()
    return sorted(METHODS)


def dataset_names() -> list[str]:
    from .data import DATASETS

    return sorted(DATASETS)


def protocol_names() -> list[str]:
    from .eval import PROTOCOLS

    return sorted(PROTOCOLS)


def check_model_name(name: str) -> None:
    """A timm model name (this package's models are registered on import)."""
    import timm

    if not timm.is_model(name):
        raise UnknownNameError("timm model", name, timm.list_models())


def make_logger(kind: str, out: str | os.PathLike | None):
    """The Lightning logger of ``--logger``: ``csv`` (files under ``OUT/logs``), ``tensorboard`` or ``wandb``
    (each only if its package is installed: an error saying what to install otherwise). ``out=None`` only
    checks that the package is there."""
    import importlib.util

    import pytorch_lightning as pl

    if kind not in LOGGERS:
        raise UnknownNameError("logger", kind, LOGGERS)
    if kind == "csv":
        return pl.loggers.CSVLogger(str(out), name="logs") if out is not None else None
    if kind == "tensorboard":
        if not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
            raise UsageError("--logger tensorboard needs the tensorboard package: pip install tensorboard")
        return pl.loggers.TensorBoardLogger(str(out), name="logs") if out is not None else None
    if kind == "wandb":
        if importlib.util.find_spec("wandb") is None:
            raise UsageError("--logger wandb needs the wandb package: pip install wandb (then `wandb login`)")
        return pl.loggers.WandbLogger(save_dir=str(out), project="diffssl") if out is not None else None
    return None


LOGGERS = ("csv", "tensorboard", "wandb")


# ---------------------------------------------------------------------------------------------- --config
#: options a config file may not set (they are about the command line itself)
_NOT_IN_CONFIG = {"config", "help", "debug", "list"}


def _config_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config keys (option names without dashes, ``-`` or ``_``) → their actions."""
    out = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in _NOT_IN_CONFIG:
            continue
        name = max(action.option_strings, key=len).lstrip("-")
        out[name] = out[name.replace("-", "_")] = action
    return out


def _mentioned(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of the options given on the command line."""
    seen = set()
    for token in argv:
        if token.startswith("--"):
            action = parser._option_string_actions.get(token.split("=", 1)[0])
            if action is not None:
                seen.add(action.dest)
    return seen


def config_tokens(path: str, parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """The command-line tokens a YAML config file stands for, checked key by key against ``parser``'s options
    (command-line ``argv`` given after them overrides them). Errors name the file and the key."""
    import yaml

    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise UsageError(f"--config: no such file {file}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config: cannot read {file}: {e}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config {file}: not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise UsageError(f"--config {file}: expected a mapping of option names to values, got {type(data).__name__}")
    actions = _config_actions(parser)
    valid = sorted(k for k in actions if "_" not in k or k.replace("_", "-") not in actions)
    given = _mentioned(parser, argv)
    exclusive = {a.dest: g for g in parser._mutually_exclusive_groups for a in g._group_actions}
    tokens: list[str] = []
    for key, value in data.items():
        action = actions.get(str(key))
        if action is None:
            raise UsageError(f"--config {file}: unknown key {key!r}; valid keys: {', '.join(valid)}")
        group = exclusive.get(action.dest)
        if group is not None and any(a.dest in given for a in group._group_actions):
            continue  # the command line chose another member of the group
        option = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UsageError(f"--config {file}: {key} must be true or false, got {value!r}")
            tokens += [option] if value else []
            continue
        if value is None:
            continue
        text = _as_text(value)
        _check_value(action, text, f"--config {file}: {key}")
        tokens += [option, text]
    return tokens


def _as_text(value) -> str:
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _check_value(action: argparse.Action, text: str, where: str) -> None:
    convert: Callable = action.type or str
    try:
        value = convert(text)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise UsageError(f"{where}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{where}: invalid choice {text!r}; valid: {', '.join(map(str, action.choices))}")
