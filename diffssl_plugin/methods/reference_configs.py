"""Reference pretraining configs (``diffssl_plugin/configs/*.yaml``, shipped in the wheel as package data):
published settings of a learner, with the published numbers beside them, turned into one
:func:`~diffssl_plugin.methods.training.pretrain` call.

A config names ``method``, ``dataset``, ``batch_size``, ``epochs`` (and optionally ``warmup_epochs``,
``precision``, ``seed``), ``method_kwargs`` for the learner, and ``reference`` (the published numbers; never
read by the code). Epochs become a step budget, ``epochs × ⌊images / batch⌋``; warm-up epochs become the
learner's ``warmup_steps``. A learner with an ``img_size`` argument (MAE) gets the dataset's image size.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from ..errors import InputError
from .registry import get_method

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
KEYS = {
    "method",
    "dataset",
    "batch_size",
    "epochs",
    "warmup_epochs",
    "precision",
    "seed",
    "method_kwargs",
    "reference",
    # read by `diffssl reproduce` (diffssl_plugin/published.py): the published rows, evaluation protocol,
    # expected compute, and for eval-only configs (no `method`) the published checkpoint
    "title",
    "published",
    "eval",
    "compute",
    "checkpoint",
    "dry_run",
    "notes",
}


def config_path(name: str | os.PathLike) -> Path:
    """A config file: a path, or the name of a file in :data:`CONFIG_DIR` (``"simclr_cifar10"``)."""
    path = Path(name)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise InputError(f"no reference config {str(name)!r}; give a YAML path or one of: {', '.join(known) or '(none)'}")


def load_config(name: str | os.PathLike) -> dict:
    """Read and check a reference config (unknown keys and unregistered methods raise :class:`InputError`)."""
    import yaml

    path = config_path(name)
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise InputError(f"{path}: a reference config must be a YAML mapping")
    unknown = sorted(set(config) - KEYS)
    eval_only = "method" not in config and "checkpoint" in config  # evaluates a published checkpoint
    required = {"dataset"} if eval_only else {"method", "dataset", "batch_size", "epochs"}
    missing = sorted(required - set(config))
    if unknown or missing:
        raise InputError(f"{path}: unknown keys {unknown}, missing keys {missing}; valid keys: {sorted(KEYS)}")
    if not eval_only:
        get_method(config["method"])
    return config


def pretrain_kwargs(config: dict, **overrides) -> dict:
    """The keyword arguments of ``pretrain(...)`` that ``config`` stands for; ``overrides`` (any ``pretrain``
    argument, e.g. ``dataset``, ``budget``, ``max_images``, ``out_dir``) replace the config's values, and an
    overriding ``method_kwargs`` is merged into the config's."""
    from ..data import DATASETS, load_split
    from .training import Budget

    dataset = overrides.pop("dataset", config["dataset"])
    batch = int(overrides.pop("batch_size", config["batch_size"]))
    max_images = overrides.pop("max_images", None)
    images = max_images or len(load_split(dataset, "trainval", root=overrides.get("data_root")))
    steps_per_epoch = max(1, images // batch)
    method_kwargs = {**config.get("method_kwargs", {}), **overrides.pop("method_kwargs", {})}
    if "warmup_epochs" in config:
        method_kwargs.setdefault("warmup_steps", int(config["warmup_epochs"] * steps_per_epoch))
    model_cls = get_method(config["method"])["model"]
    if "img_size" in inspect.signature(model_cls.__init__).parameters and dataset in DATASETS:
        method_kwargs.setdefault("img_size", DATASETS[dataset].image_size)
    kwargs = {
        "method": config["method"],
        "dataset": dataset,
        "batch_size": batch,
        "max_images": max_images,
        "budget": Budget(steps=int(config["epochs"]) * steps_per_epoch),
        "precision": config.get("precision", "bf16-mixed"),
        "seed": int(config.get("seed", 0)),
        "method_kwargs": method_kwargs,
        "out_dir": f"runs/reference/{config['method']}",
    }
    kwargs.update(overrides)
    return kwargs


def pretrain_from_config(name: str | os.PathLike, **overrides):
    """Pretrain with a reference config (see :func:`pretrain_kwargs` for ``overrides``)."""
    from .training import pretrain

    config = load_config(name)
    if "method" not in config:
        raise InputError(
            f"{name}: an eval-only config (no 'method' to pretrain); use `diffssl reproduce {name} --checkpoint PATH`"
        )
    return pretrain(**pretrain_kwargs(config, **overrides))
