"""ImageFolder trees: Tiny-ImageNet, ImageNet (with the SimCLR 1%/10% lists) and your own folders.

Every tree is scanned with torchvision's ``ImageFolder`` (classes = sorted sub-folder names, files sorted within
each), decoded once into the memory-mapped cache of :mod:`.cache` at a fixed square size, and reused after.
Expected layouts, under the data root ``ROOT`` (``--data-root``, else ``$DIFFSSL_DATA_ROOT``, else
``~/.cache/diffssl/data``)::

    ROOT/tiny-imagenet-200/             (the official zip, unpacked as is; ROOT itself may be this folder)
        wnids.txt
        train/<wnid>/images/<wnid>_<k>.JPEG          -> "trainval" (100,000; val = 10% per class carved, seed 0)
        val/val_annotations.txt                       -> "test" (10,000; the official labelled val set)
        val/images/val_<k>.JPEG
        test/images/...                               (unlabelled: not used)

    ROOT/imagenet/                      (ILSVRC-2012; ROOT itself may be this folder)
        train/<wnid>/<wnid>_<k>.JPEG                  -> "trainval" (1,281,167; val = 1% per class carved, seed 0)
        val/<wnid>/ILSVRC2012_val_<k>.JPEG            -> "test" (50,000; the official val set, sorted into wnids)
        1percent.txt, 10percent.txt                   -> "train_1pct", "train_10pct" (the SimCLR subset lists)

Class names are the folder names (WordNet ids for the two ImageNets: unique, unlike the human-readable names).
ImageNet has no labelled test set, so its official validation images are our ``"test"`` split and model
selection uses a 1%-per-class split carved from train (about 12.8k images; an official-val-free choice that
the papers leave open). The subset lists are the SimCLR files (one ``<wnid>_<k>.JPEG`` per line, from
https://github.com/google-research/simclr/tree/master/imagenet_subsets), used as published: they are drawn
from the whole train set, so about 1% of a subset's images also sit in our carved ``val`` split.
``ImageSet.indices`` of a subset are its rows' positions in ``"trainval"``, so the overlap can be checked.

Your own data: :func:`register_image_folder` adds an ImageFolder tree ``ROOT/<folder>/{train,test}/<class>/*``
(optionally ``val/`` as an official validation split) under a name of your choice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DatasetNotFoundError
from .cache import Plan, cache_folder, cached_part
from .sources import Part, data_root, not_found
from .splits import train_then_val


def scan(folder: Path) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """Files, labels and class names of an ImageFolder tree (torchvision's scan; nothing is decoded)."""
    from torchvision.datasets import ImageFolder

    try:
        ds = ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as e:
        raise DatasetNotFoundError(f"cannot read the image folder {folder}: {e}") from e
    files = [path for path, _ in ds.samples]
    labels = np.fromiter((label for _, label in ds.samples), dtype=np.int64, count=len(ds.samples))
    return files, labels, tuple(ds.classes)


def _relabel(labels: np.ndarray, classes: tuple[str, ...], train_classes: tuple[str, ...], folder: Path) -> np.ndarray:
    """Labels of a second tree (val/test) in the train tree's class numbering; unknown classes are an error."""
    index = {c: i for i, c in enumerate(train_classes)}
    unknown = sorted(set(classes) - set(index))
    if unknown:
        raise DatasetNotFoundError(
            f"{folder} has classes that train/ lacks: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    mapping = np.array([index[c] for c in classes], dtype=np.int64)
    return mapping[labels]


@dataclass(frozen=True)
class FolderSet:
    """A dataset stored as an ImageFolder-style tree, loaded part by part through the memmap cache.

    Called by the registry as ``loader(part, root=, download=, image_size=, val_fraction=)``.
    """

    name: str
    dirnames: tuple[str, ...]  # where under the data root to look, first match wins ("" is the root itself)
    layout: str
    how: str
    train: str = "train"
    val: str | None = None  # a folder with an official validation split, if the set has one
    test: str = "test"
    channels: int = 3
    marker: str | None = None  # a file that must exist in the dataset folder (tells datasets apart)
    subsets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # extra split -> list-file candidates

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def locate(self, root: str | os.PathLike | None) -> Path:
        base = data_root(root)
        for d in self.dirnames:
            cand = base / d
            if (cand / self.train).is_dir() and (self.marker is None or (cand / self.marker).is_file()):
                return cand
        raise not_found(
            self.name,
            base,
            self.layout,
            self.how,
            "looked for " + ", ".join(str(base / d / self.train) for d in self.dirnames),
        )

    def __call__(
        self, part: str, *, root: str | os.PathLike | None, download: bool, image_size: int, val_fraction: float
    ) -> Part:
        base = self.locate(root)
        folder = cache_folder(data_root(root), self.name, image_size)
        desc = f"caching {self.name} {part} at {image_size}px"
        if part == "trainval":

            def plan():
                return self.plan_trainval(base, val_fraction)
        elif part == "test":

            def plan():
                return self.plan_test(base)
        else:

            def plan():
                return self.plan_subset(base, part, val_fraction)

        return cached_part(folder, part, image_size, plan, desc, self.channels, self.mode)

    def plan_trainval(self, base: Path, val_fraction: float) -> Plan:
        """Training rows first, then the validation rows (official, or carved with seed 0)."""
        files, labels, classes = scan(base / self.train)
        if self.val is not None:
            vfiles, vlabels, vclasses = scan(base / self.val)
            vlabels = _relabel(vlabels, vclasses, classes, base / self.val)
            return Plan(files + vfiles, np.concatenate([labels, vlabels]), classes, base, len(files), "official")
        order, val_start = train_then_val(labels, val_fraction, seed=0)
        return Plan([files[i] for i in order], labels[order], classes, base, val_start, "cache")

    def plan_test(self, base: Path) -> Plan:
        folder = base / self.test
        _, _, train_classes = scan(base / self.train)
        files, labels, classes = scan(folder)
        return Plan(files, _relabel(labels, classes, train_classes, folder), train_classes, base)

    def plan_subset(self, base: Path, part: str, val_fraction: float) -> Plan:
        """A published subset of the training images, given as a list of file names (one per line)."""
        candidates = [base / name for name in self.subsets[part]]
        list_file = next((p for p in candidates if p.is_file()), None)
        if list_file is None:
            raise DatasetNotFoundError(
                f"split {part!r} of {self.name!r} needs its list file; put it at {candidates[0]}. {self.how}"
            )
        wanted = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        trainval = self.plan_trainval(base, val_fraction)
        row_of = {os.path.basename(f): r for r, f in enumerate(trainval.files)}
        missing = [w for w in wanted if os.path.basename(w) not in row_of]
        if missing:
            raise DatasetNotFoundError(
                f"{len(missing)} of {len(wanted)} files listed in {list_file} are not under "
                f"{base / self.train}, e.g. {', '.join(missing[:3])}"
            )
        rows = np.unique(np.array([row_of[os.path.basename(w)] for w in wanted], dtype=np.int64))
        return Plan([trainval.files[r] for r in rows], trainval.labels[rows], trainval.class_names, base, indices=rows)


@dataclass(frozen=True)
class TinyImageNet(FolderSet):
    """Tiny-ImageNet-200: the labelled val/ folder (flat, labels in val_annotations.txt) is the test split."""

    def plan_test(self, base: Path) -> Plan:
        _, _, classes = scan(base / self.train)
        ann = base / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise not_found(self.name, base, self.layout, self.how, f"missing {ann}")
        index = {c: i for i, c in enumerate(classes)}
        files, labels = [], []
        for line in ann.read_text().splitlines():
            if not line.strip():
                continue
            fname, wnid = line.split("\t")[:2]
            if wnid not in index:
                raise DatasetNotFoundError(f"{ann}: class {wnid!r} of {fname} is not a folder of {base / 'train'}")
            files.append(str(base / "val" / "images" / fname))
            labels.append(index[wnid])
        return Plan(files, np.array(labels, dtype=np.int64), classes, base)


@dataclass(frozen=True)
class ImageNet(FolderSet):
    """ILSVRC-2012 as ImageFolder trees; refuses the flat val/ folder of the original archive with a fix."""

    def plan_test(self, base: Path) -> Plan:
        val = base / self.test
        if val.is_dir() and not any(p.is_dir() for p in val.iterdir()):
            raise DatasetNotFoundError(
                f"{val} holds loose images: sort them into val/<wnid>/ first (torchvision.datasets.ImageNet(ROOT, "
                f"split='val') does it from ILSVRC2012_devkit_t12.tar.gz, or use the common valprep.sh script)"
            )
        return super().plan_test(base)


TINY_IMAGENET = TinyImageNet(
    "tiny_imagenet",
    ("tiny-imagenet-200", ""),
    marker="wnids.txt",
    layout="  ROOT/tiny-imagenet-200/wnids.txt\n  ROOT/tiny-imagenet-200/train/<wnid>/images/<wnid>_<k>.JPEG\n"
    "  ROOT/tiny-imagenet-200/val/val_annotations.txt\n  ROOT/tiny-imagenet-200/val/images/val_<k>.JPEG",
    how="Download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into ROOT.",
)

IMAGENET = ImageNet(
    "imagenet",
    ("imagenet", ""),
    test="val",
    subsets={
        "train_1pct": ("1percent.txt", "imagenet_subsets/1percent.txt"),
        "train_10pct": ("10percent.txt", "imagenet_subsets/10percent.txt"),
    },
    layout="  ROOT/imagenet/train/<wnid>/<wnid>_<k>.JPEG\n  ROOT/imagenet/val/<wnid>/ILSVRC2012_val_<k>.JPEG\n"
    "  ROOT/imagenet/1percent.txt, 10percent.txt   (optional: the SimCLR subset lists)",
    how="Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org (free account), "
    "unpack train into one folder per wnid and sort val into wnid folders; the subset lists are at "
    "https://raw.githubusercontent.com/google-research/simclr/master/imagenet_subsets/1percent.txt (and "
    "10percent.txt).",
)


def folder_set(name: str, folder: str, channels: int = 3, val: bool = False, test: str = "test") -> FolderSet:
    """A :class:`FolderSet` for a user's tree ``ROOT/<folder>/{train,[val,]<test>}/<class>/<image>``."""
    parts = ["train", "val", test] if val else ["train", test]
    return FolderSet(
        name,
        (folder,),
        channels=channels,
        val="val" if val else None,
        test=test,
        layout="\n".join(f"  ROOT/{folder}/{p}/<class>/<image>" for p in parts),
        how=f"Put your images in one folder per class under ROOT/{folder}/.",
    )
