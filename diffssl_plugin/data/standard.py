"""CIFAR-10, CIFAR-100 and STL-10 through torchvision, held in memory as uint8 arrays.

torchvision checks each file's MD5 against the official archive before reading it; the CIFAR batches are Python
pickles (the dataset's own distribution format), so that check is also what makes unpickling them safe. A copy
whose checksums differ is reported as missing or corrupted, not read. Expected layouts under the data root
``ROOT`` (``--data-root``, else ``$DIFFSSL_DATA_ROOT``, else ``~/.cache/diffssl/data``), i.e. the official
archives unpacked there, which is also where ``download=True`` puts them::

    ROOT/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta
    ROOT/cifar-100-python/train, test, meta
    ROOT/stl10_binary/train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin, class_names.txt

Splits: ``trainval`` is the official training set (50,000 for CIFAR; STL-10's 5,000 labelled images, all ten
folds together as most self-supervised papers use them), ``test`` the official test set (10,000; STL-10:
8,000), ``val`` the registry's 10%-per-class seeded carve. STL-10 adds ``"unlabeled"`` (100,000 images, label
-1) and ``"train+unlabeled"`` (105,000) for pretraining; they load only when asked (2.8 GB in memory).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .sources import Part, open_torchvision

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")

LAYOUTS = {
    "cifar10": "  ROOT/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta",
    "cifar100": "  ROOT/cifar-100-python/train, test, meta",
    "stl10": "  ROOT/stl10_binary/train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin, class_names.txt",
}
HOW = {
    "cifar10": "Pass download=True (torchvision), or unpack "
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into ROOT.",
    "cifar100": "Pass download=True (torchvision), or unpack "
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz into ROOT.",
    "stl10": "Pass download=True (torchvision, 2.6 GB), or unpack "
    "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz into ROOT.",
}
STL10_SPLITS = {"trainval": "train", "test": "test", "unlabeled": "unlabeled", "train+unlabeled": "train+unlabeled"}


def _cifar(name: str, part: str, root: str | os.PathLike | None, download: bool) -> Part:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR100 if name == "cifar100" else CIFAR10

    def factory(r: str, d: bool) -> Any:
        return cls(r, train=part == "trainval", download=d)

    ds = open_torchvision(name, factory, root, download, LAYOUTS[name], HOW[name])
    images = np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2))  # NHWC -> NCHW
    return Part(images, np.asarray(ds.targets, dtype=np.int64), tuple(ds.classes))


def _cifar_loader(name: str, doc: str) -> Callable[..., Part]:
    """The registry's ``loader(part, root=, download=, image_size=, val_fraction=)`` for the CIFAR set ``name``
    (always 32×32, so ``image_size`` and ``val_fraction`` are unused), named ``load_{name}`` so it pickles."""

    def load(
        part: str,
        *,
        root: str | os.PathLike | None = None,
        download: bool = True,
        image_size: int = 32,
        val_fraction: float = 0.1,
    ) -> Part:
        return _cifar(name, part, root, download)

    load.__name__ = load.__qualname__ = f"load_{name}"
    load.__doc__ = doc
    return load


load_cifar10 = _cifar_loader("cifar10", """CIFAR-10 ``"trainval"`` (50,000) or ``"test"`` (10,000), 32×32 RGB.""")
load_cifar100 = _cifar_loader(
    "cifar100", """CIFAR-100 with its 100 fine labels, ``"trainval"`` (50,000) or ``"test"`` (10,000), 32×32 RGB."""
)


def load_stl10(
    part: str,
    *,
    root: str | os.PathLike | None = None,
    download: bool = True,
    image_size: int = 96,
    val_fraction: float = 0.1,
) -> Part:
    """STL-10 at 96×96: ``"trainval"`` (5,000 labelled), ``"test"``, ``"unlabeled"``, ``"train+unlabeled"``."""
    from torchvision.datasets import STL10

    def factory(r: str, d: bool) -> Any:
        return STL10(r, split=STL10_SPLITS[part], download=d)

    ds = open_torchvision("stl10", factory, root, download, LAYOUTS["stl10"], HOW["stl10"])
    classes = tuple(getattr(ds, "classes", None) or STL10_CLASSES)
    return Part(np.ascontiguousarray(ds.data, dtype=np.uint8), np.asarray(ds.labels, dtype=np.int64), classes)
