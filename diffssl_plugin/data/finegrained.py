"""The fine-grained transfer targets (Kornblith et al. 2019, as used by SimCLR/BYOL) through torchvision.

torchvision's classes read the official split files; we take from them only the file paths and labels (through
their ``loader`` argument, so nothing is decoded twice) and decode the images once into the memory-mapped cache
of :mod:`.cache` at a fixed square size (default 224, the transfer protocol's; pass ``image_size=`` to
``load_split`` for the size your backbone takes: each size is its own cache). Splits:

=================  =======================================  ==========================================  =====
name               ``trainval`` (``train`` + ``val``)        ``val``                                     test
=================  =======================================  ==========================================  =====
``flowers102``     official train + val (1,020 + 1,020)     official val                                6,149
``oxford_pets``    official trainval (3,680)                10% per class, carved (seed 0)              3,669
``fgvc_aircraft``  official train + val, variants (6,667)   official val (3,333)                        3,333
``stanford_cars``  official train (8,144)                   10% per class, carved (seed 0)              8,041
``dtd``            partition 1 train + val (1,880 + 1,880)  official val                                1,880
``food101``        official train (75,750)                  10% per class, carved (seed 0)              25,250
=================  =======================================  ==========================================  =====

Official validation splits are used where the dataset has one (model selection then never sees the official
training images it is scored against); elsewhere the registry's rule (10% per class, seed 0) applies. Either
way the validation split is fixed, so ``val_seed`` other than 0 is refused. FGVC-Aircraft images keep their
bottom copyright banner (torchvision reads the files as they are). Expected layouts under the data root ``ROOT``
are in :data:`LAYOUTS`; torchvision downloads every set except Stanford Cars when ``download=True``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import DatasetNotFoundError
from .cache import Plan, cache_folder, cached_part
from .sources import Part, data_root, open_torchvision
from .splits import train_then_val

LAYOUTS = {
    "flowers102": "  ROOT/flowers-102/jpg/image_<00001>.jpg\n  ROOT/flowers-102/imagelabels.mat\n"
    "  ROOT/flowers-102/setid.mat",
    "oxford_pets": "  ROOT/oxford-iiit-pet/images/<Breed>_<k>.jpg\n"
    "  ROOT/oxford-iiit-pet/annotations/trainval.txt, test.txt",
    "fgvc_aircraft": "  ROOT/fgvc-aircraft-2013b/data/images/<id>.jpg\n  ROOT/fgvc-aircraft-2013b/data/variants.txt\n"
    "  ROOT/fgvc-aircraft-2013b/data/images_variant_{train,val,test}.txt",
    "stanford_cars": "  ROOT/stanford_cars/devkit/cars_meta.mat, cars_train_annos.mat\n"
    "  ROOT/stanford_cars/cars_train/<05d>.jpg\n  ROOT/stanford_cars/cars_test/<05d>.jpg\n"
    "  ROOT/stanford_cars/cars_test_annos_withlabels.mat",
    "dtd": "  ROOT/dtd/dtd/images/<class>/<class>_<k>.jpg\n  ROOT/dtd/dtd/labels/train1.txt, val1.txt, test1.txt",
    "food101": "  ROOT/food-101/images/<class>/<id>.jpg\n  ROOT/food-101/meta/train.json, test.json",
}

HOW = {
    "flowers102": "Pass download=True (torchvision), or get 102flowers.tgz, imagelabels.mat and setid.mat from "
    "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/.",
    "oxford_pets": "Pass download=True (torchvision), or get images.tar.gz and annotations.tar.gz from "
    "https://www.robots.ox.ac.uk/~vgg/data/pets/.",
    "fgvc_aircraft": "Pass download=True (torchvision), or get fgvc-aircraft-2013b.tar.gz from "
    "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/.",
    "stanford_cars": "torchvision can no longer download it (the original URL is gone): find a copy of "
    "car_devkit.tgz, cars_train.tgz, cars_test.tgz and cars_test_annos_withlabels.mat.",
    "dtd": "Pass download=True (torchvision), or unpack dtd-r1.0.1.tar.gz from "
    "https://www.robots.ox.ac.uk/~vgg/data/dtd/ into ROOT/dtd/.",
    "food101": "Pass download=True (torchvision, 5 GB), or unpack food-101.tar.gz from "
    "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ into ROOT.",
}


def _path_only(path: str | os.PathLike) -> str:
    """A torchvision ``loader`` that returns the path: ``ds[i]`` then costs nothing."""
    return str(path)


@dataclass(frozen=True)
class TorchvisionFiles:
    """A torchvision file-based dataset, loaded part by part through the memmap cache.

    ``trainval`` names the torchvision split(s) that make up our trainval; two names mean (train, official val).
    """

    name: str
    class_name: str
    trainval: tuple[str, ...]
    test: str = "test"
    kwargs: dict = field(default_factory=dict)
    can_download: bool = True

    def open(self, split: str, root: str | os.PathLike | None, download: bool) -> Any:
        import torchvision
        import torchvision.datasets as tvd

        cls = getattr(tvd, self.class_name)

        def factory(r: str, d: bool) -> Any:
            if self.class_name == "OxfordIIITPet":  # no loader argument: the split file is read in _samples
                return cls(r, split=split, download=d, **self.kwargs)
            return cls(r, split=split, download=d, loader=_path_only, **self.kwargs)

        try:
            return open_torchvision(
                self.name, factory, root, download, LAYOUTS[self.name], HOW[self.name], self.can_download
            )
        except TypeError as e:  # older torchvision releases have no loader= argument on these classes
            raise DatasetNotFoundError(
                f"{self.name} needs a torchvision whose torchvision.datasets.{self.class_name} accepts loader= "
                f"(installed: torchvision {torchvision.__version__}); "
                f"upgrade torchvision. Detail: {e}"
            ) from e

    def samples(
        self, split: str, root: str | os.PathLike | None, download: bool
    ) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
        ds = self.open(split, root, download)
        if self.class_name == "OxfordIIITPet":
            # torchvision decodes in __getitem__; its split file is "<image id> <class 1..37> <species> <breed>"
            pets = data_root(root) / "oxford-iiit-pet"
            rows = [
                line.split()
                for line in (pets / "annotations" / f"{split}.txt").read_text().splitlines()
                if line.strip()
            ]
            files = [str(pets / "images" / f"{r[0]}.jpg") for r in rows]
            labels = np.array([int(r[1]) - 1 for r in rows], dtype=np.int64)
        else:
            pairs = [ds[i] for i in range(len(ds))]
            files = [p for p, _ in pairs]
            labels = np.array([label for _, label in pairs], dtype=np.int64)
        if len(files) != len(ds):
            raise RuntimeError(f"{self.name} {split}: {len(files)} files read, torchvision has {len(ds)}")
        return files, labels, tuple(str(c) for c in ds.classes)

    def __call__(
        self, part: str, *, root: str | os.PathLike | None, download: bool, image_size: int, val_fraction: float
    ) -> Part:
        base = data_root(root)

        def plan() -> Plan:
            if part == "test":
                files, labels, classes = self.samples(self.test, root, download)
                return Plan(files, labels, classes, base)
            parts = [self.samples(s, root, download) for s in self.trainval]
            files, labels, classes = parts[0]
            if len(parts) == 2:  # (train, official val)
                vfiles, vlabels, _ = parts[1]
                return Plan(files + vfiles, np.concatenate([labels, vlabels]), classes, base, len(files), "official")
            order, val_start = train_then_val(labels, val_fraction, seed=0)
            return Plan([files[i] for i in order], labels[order], classes, base, val_start, "cache")

        # checks the data is there (and downloads it if asked) even when a cache exists, so errors name the data
        self.open(self.test if part == "test" else self.trainval[0], root, download)
        return cached_part(
            cache_folder(base, self.name, image_size),
            part,
            image_size,
            plan,
            f"caching {self.name} {part} at {image_size}px",
        )


FINEGRAINED = {
    "flowers102": TorchvisionFiles("flowers102", "Flowers102", ("train", "val")),
    "oxford_pets": TorchvisionFiles("oxford_pets", "OxfordIIITPet", ("trainval",), kwargs={"target_types": "category"}),
    "fgvc_aircraft": TorchvisionFiles(
        "fgvc_aircraft", "FGVCAircraft", ("train", "val"), kwargs={"annotation_level": "variant"}
    ),
    "stanford_cars": TorchvisionFiles("stanford_cars", "StanfordCars", ("train",), can_download=False),
    "dtd": TorchvisionFiles("dtd", "DTD", ("train", "val"), kwargs={"partition": 1}),
    "food101": TorchvisionFiles("food101", "Food101", ("train",)),
}

NUM_CLASSES = {
    "flowers102": 102,
    "oxford_pets": 37,
    "fgvc_aircraft": 100,
    "stanford_cars": 196,
    "dtd": 47,
    "food101": 101,
}
