"""Dry-run data: the shape facts of the standard datasets, and tiny stand-in datasets (a few real images when the
dataset is installed, else synthetic ones of its shape) that ``diffssl reproduce --dry-run`` registers."""

from __future__ import annotations

import numpy as np

from ..errors import DiffSSLError, UnknownNameError
from .registry import DATASETS, DatasetSpec, _load_arrays, load_split, register_dataset

#: shape facts of the standard datasets, used when a dataset is not registered (yet) on this machine:
#: (channels, image size the configs use, classes, training images)
DATASET_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "cifar10": (3, 32, 10, 50_000),
    "cifar100": (3, 32, 100, 50_000),
    "stl10": (3, 96, 10, 105_000),
    "tiny_imagenet": (3, 64, 200, 100_000),
    "imagenet": (3, 256, 1000, 1_281_167),
    "imagenet_1pct": (3, 256, 1000, 12_811),
    "imagenet_10pct": (3, 256, 1000, 128_116),
    "fashion_mnist": (1, 28, 10, 60_000),
}


def dataset_shape(name: str, root: str | None = None) -> tuple[int, int, int, int]:
    """(channels, image size, classes, training images) of a dataset: from the registry when it is there,
    else from :data:`DATASET_SHAPES`."""

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

    channels, size, num_classes, _ = dataset_shape(name, root)
    kind, x = "synthetic", None
    if name in DATASETS:
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
    register_dataset(
        DatasetSpec(
            tiny,
            lambda root=None, download=False: arrays,
            classes,
            channels,
            size,
            f"dry-run stand-in for {name} ({kind} images)",
            val_fraction=0.5,
        )
    )
    _load_arrays.cache_clear()
    return tiny, kind
