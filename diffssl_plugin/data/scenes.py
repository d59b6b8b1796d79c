"""Segmentation data: offline scenes composed from Fashion-MNIST items, and VOC / ADE20K for users who have them.

``load_segmentation(name, split)`` gives a :class:`SegmentationSet`: uint8 images (N, C, H, W), uint8 masks
(N, H, W) holding class indices, ``class_names``, and ``ignore_index`` (255) for pixels nobody should score.

**``fashion_scenes``** (offline, the default). Each scene is a ``canvas``×``canvas`` black image on which
2–4 Fashion-MNIST items (28×28) are drawn one after another at random integer positions that keep the item
inside the canvas; items may overlap and a later item covers an earlier one. An item's pixel is **on** when its
value is at least ``threshold`` (default 32 of 255, i.e. 12.5%: Fashion-MNIST backgrounds are 0 and the faint
rim of an item is dropped, so a pixel is never half one item and half another). Only on pixels are drawn; the
label of a pixel is ``1 + class`` of the topmost item whose pixel is on there, and 0 (``"background"``)
where no item is on, so a scene pixel is non-zero exactly where its label is not background. Nothing is
ignored (no 255 in these masks). Scenes of the ``train`` split are built from Fashion-MNIST's train split,
``val`` from the validation split carved from it, ``test`` from the official test split
(:func:`diffssl_plugin.data.load_split`), so no item is seen in two splits. Everything is fixed by ``seed``
(and the split): the same arguments give the same scenes.

The default canvas is **56×56**, not 64×64: 56 = 2 × 28, so a backbone with a fixed 28×28 input (the MAE ViT's
7×7 position embeddings, the DRL and MDSM networks' size checks) reads a scene as four whole 28×28 tiles, and
it is a multiple of every stride of our networks (4 for the U-Net, 8 for the CIFAR-stem ResNet).

**``voc``** (PASCAL VOC 2012, torchvision's ``VOCSegmentation`` under ``root``) and **``ade20k``** (the
``ADEChallengeData2016`` folder under ``root``): images resized bilinearly and masks by nearest neighbour to
``size``×``size`` (aspect ratio not kept). Neither has public test labels, so ``test`` is the official
validation set and ``train``/``val`` split the official training set (a fixed 10% of it is ``val``). VOC keeps
its 21 classes (0 = background) and its 255 object borders; ADE20K's label 0 ("other") becomes 255 and labels
1–150 become classes 0–149 (mmsegmentation's ``reduce_zero_label``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetNotFoundError, InputError, check_name
from .registry import SPLITS, ImageArrays, load_split
from .sources import default_download_root

IGNORE_INDEX = 255
BACKGROUND = "background"
#: default number of scenes per split (generation is vectorised; 1,000 56×56 scenes take ~3 MB)
DEFAULT_SCENES = {"train": 1000, "val": 500, "test": 1000, "trainval": 1000}
_SPLIT_SEED = {"train": 0, "val": 1, "test": 2, "trainval": 3}  # different layouts in every split


@dataclass(frozen=True)
class SegmentationSet(ImageArrays):
    """One split of a segmentation dataset in memory: ``images`` uint8 (N, C, H, W), ``masks`` uint8 (N, H, W)
    of class indices (``ignore_index`` marks pixels that are not scored)."""

    name: str
    split: str
    images: torch.Tensor
    masks: torch.Tensor
    class_names: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX
    meta: dict = field(default_factory=dict, repr=False)  # how it was made (generator settings, files, ...)

    def __post_init__(self):
        if (
            self.images.dim() != 4
            or self.masks.dim() != 3
            or self.images.shape[0] != self.masks.shape[0]
            or self.images.shape[-2:] != self.masks.shape[-2:]
        ):
            raise InputError(
                f"images (N, C, H, W) and masks (N, H, W) must agree, got {tuple(self.images.shape)} "
                f"and {tuple(self.masks.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def take(self, idx) -> SegmentationSet:
        """A sub-set by positions."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return SegmentationSet(
            self.name, self.split, self.images[idx], self.masks[idx], self.class_names, self.ignore_index, self.meta
        )


# ---------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class SceneLayout:
    """Where each scene's items went, in drawing order: ``items`` (N, K) positions in the source set (-1 for an
    unused slot), ``top``/``left`` (N, K) pixel offsets of each item's 28×28 box."""

    items: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor


def compose_scenes(
    items: torch.Tensor,
    labels: torch.Tensor,
    num_scenes: int,
    canvas: int = 56,
    items_per_scene: tuple[int, int] = (2, 4),
    threshold: int = 32,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, SceneLayout]:
    """Draw ``num_scenes`` scenes from ``items`` (uint8 (M, C, h, w)) with class ``labels`` (M,).

    Returns uint8 images (N, C, canvas, canvas), uint8 masks (N, canvas, canvas) with ``1 + label`` of the
    topmost on item and 0 elsewhere, and the :class:`SceneLayout`. Vectorised over scenes and pixels; the only
    loop is over the (at most ``items_per_scene[1]``) drawing slots.
    """
    lo, hi = (int(v) for v in items_per_scene)
    if items.dim() != 4 or items.dtype != torch.uint8 or len(items) != len(labels) or not len(items):
        raise InputError(
            f"items must be a non-empty uint8 (M, C, h, w) tensor with one label each, got "
            f"{tuple(items.shape)} {items.dtype} and {len(labels)} labels"
        )
    n, c, h, w = int(num_scenes), items.shape[1], items.shape[2], items.shape[3]
    if n < 0 or not 1 <= lo <= hi or canvas < max(h, w) or not 0 < threshold <= 255:
        raise InputError(
            f"bad scene settings: num_scenes={num_scenes}, items_per_scene={items_per_scene} "
            f"(need 1 <= min <= max), canvas={canvas} (need >= {max(h, w)}), threshold={threshold} "
            "(need 1..255)"
        )
    if int(labels.max()) + 1 >= IGNORE_INDEX:
        raise InputError(f"too many classes for uint8 masks with ignore index {IGNORE_INDEX}")
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(lo, hi + 1, (n,), generator=gen)
    picks = torch.randint(0, len(items), (n, hi), generator=gen)
    top = torch.randint(0, canvas - h + 1, (n, hi), generator=gen)
    left = torch.randint(0, canvas - w + 1, (n, hi), generator=gen)
    picks = torch.where(torch.arange(hi) < counts[:, None], picks, torch.full_like(picks, -1))

    images = torch.zeros(n, canvas, canvas, c, dtype=torch.uint8)  # channels last while drawing
    masks = torch.zeros(n, canvas, canvas, dtype=torch.uint8)
    scene = torch.arange(n)[:, None, None]
    for k in range(hi):  # later slots draw over earlier ones
        active = picks[:, k] >= 0
        item = items[picks[:, k].clamp(min=0)].permute(0, 2, 3, 1)  # (N, h, w, C)
        on = (item.amax(dim=-1) >= threshold) & active[:, None, None]
        rows = top[:, k, None, None] + torch.arange(h)[None, :, None]
        cols = left[:, k, None, None] + torch.arange(w)[None, None, :]
        images[scene, rows, cols] = torch.where(on[..., None], item, images[scene, rows, cols])
        value = (labels[picks[:, k].clamp(min=0)] + 1).to(torch.uint8)[:, None, None]
        masks[scene, rows, cols] = torch.where(on, value, masks[scene, rows, cols])
    return images.permute(0, 3, 1, 2).contiguous(), masks, SceneLayout(picks, top, left)


def load_fashion_scenes(
    split: str,
    root: str | os.PathLike | None = None,
    num_images: int | None = None,
    size: int | None = None,
    seed: int = 0,
    items_per_scene: tuple[int, int] = (2, 4),
    threshold: int = 32,
    source: str = "fashion_mnist",
    download: bool = True,
) -> SegmentationSet:
    """Scenes of Fashion-MNIST items (see the module docstring); ``size`` is the canvas (default 56)."""
    data = load_split(source, split, root=root, download=download)
    n = DEFAULT_SCENES[split] if num_images is None else int(num_images)
    canvas = 56 if size is None else int(size)
    images, masks, layout = compose_scenes(
        data.images, data.labels, n, canvas, tuple(items_per_scene), threshold, seed=1000 * seed + _SPLIT_SEED[split]
    )
    meta = {
        "source": source,
        "canvas": canvas,
        "items_per_scene": list(items_per_scene),
        "threshold": threshold,
        "seed": seed,
        "layout": layout,
    }
    return SegmentationSet(
        "fashion_scenes", split, images, masks, (BACKGROUND, *tuple(data.class_names)), IGNORE_INDEX, meta
    )


# ---------------------------------------------------------------------------------------------- VOC, ADE20K
VOC_CLASSES = (
    BACKGROUND,
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def _official_split(split: str) -> str:
    """Our split → the official one it is drawn from (no public test labels: test is the official val)."""
    return "val" if split == "test" else "train"


def _pick(count: int, split: str, num_images: int | None, seed: int) -> np.ndarray:
    """Positions in the official list for ``split``: train/val split the official train list 90/10 (fixed),
    then a seeded choice of ``num_images`` of them (sorted)."""
    idx = np.arange(count)
    if split in ("train", "val"):
        held = np.random.default_rng(12345).permutation(count)[: max(1, round(0.1 * count))]
        idx = np.sort(held) if split == "val" else np.setdiff1d(idx, held)
    if num_images is not None and num_images < len(idx):
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=int(num_images), replace=False))
    return idx


def _read_pairs(
    pairs: list[tuple[Path, Path]], size: int, label_map: Callable[[np.ndarray], np.ndarray]
) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    images = np.zeros((len(pairs), size, size, 3), dtype=np.uint8)
    masks = np.zeros((len(pairs), size, size), dtype=np.uint8)
    for i, (img_path, mask_path) in enumerate(pairs):
        with Image.open(img_path) as img:
            images[i] = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))
        with Image.open(mask_path) as mask:
            masks[i] = label_map(np.asarray(mask.resize((size, size), Image.NEAREST)))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(masks)


def _pairs_set(
    name: str,
    split: str,
    pairs: list[tuple[Path, Path]],
    size: int | None,
    label_map: Callable[[np.ndarray], np.ndarray],
    class_names: tuple[str, ...],
    meta: dict,
) -> SegmentationSet:
    """The set of image/mask ``pairs`` read at ``size``² (default 224); ``meta`` gains the image files."""
    images, masks = _read_pairs(pairs, 224 if size is None else int(size), label_map)
    files = [str(p[0]) for p in pairs]
    return SegmentationSet(name, split, images, masks, class_names, IGNORE_INDEX, {**meta, "files": files})


def load_voc(
    split: str,
    root: str | os.PathLike | None = None,
    num_images: int | None = None,
    size: int | None = None,
    seed: int = 0,
    year: str = "2012",
) -> SegmentationSet:
    """PASCAL VOC segmentation through torchvision's ``VOCSegmentation`` (no download)."""
    from torchvision.datasets import VOCSegmentation

    base = Path(root) if root else default_download_root() / "voc"
    official = _official_split(split)
    try:
        ds = VOCSegmentation(str(base), year=year, image_set=official, download=False)
    except (RuntimeError, OSError, ValueError) as e:
        raise DatasetNotFoundError(
            f"PASCAL VOC {year} not found under {base} ({e}). Download VOCtrainval_11-May-2012.tar from "
            "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and extract it there, so that "
            f"{base}/VOCdevkit/VOC{year}/JPEGImages, SegmentationClass and ImageSets/Segmentation exist; then pass "
            "that folder as the data root (--data-root / root=)."
        ) from e
    idx = _pick(len(ds.images), split, num_images, seed)
    pairs = [(Path(ds.images[i]), Path(ds.masks[i])) for i in idx]
    meta = {"root": str(base), "year": year, "official_split": official}
    return _pairs_set("voc", split, pairs, size, lambda m: m.astype(np.uint8), VOC_CLASSES, meta)


def _ade_folder(root: str | os.PathLike | None) -> Path:
    base = Path(root) if root else default_download_root()
    for candidate in (base, base / "ADEChallengeData2016"):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    raise DatasetNotFoundError(
        f"ADE20K (ADEChallengeData2016) not found under {base}. Download "
        "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip and unzip it there, so that "
        f"{base}/ADEChallengeData2016/images/{{training,validation}}/*.jpg and "
        "annotations/{training,validation}/*.png exist; then pass that folder as the data root "
        "(--data-root / root=)."
    )


def ade20k_class_names(folder: Path) -> tuple[str, ...]:
    """The 150 class names from ``objectInfo150.txt`` (first synonym), or ``class_1`` … if it is absent."""
    info = folder / "objectInfo150.txt"
    if info.is_file():
        names = [
            line.split("\t")[-1].split(",")[0].strip() for line in info.read_text().splitlines()[1:] if line.strip()
        ]
        if len(names) == 150:
            return tuple(names)
    return tuple(f"class_{i}" for i in range(1, 151))


def load_ade20k(
    split: str,
    root: str | os.PathLike | None = None,
    num_images: int | None = None,
    size: int | None = None,
    seed: int = 0,
) -> SegmentationSet:
    """ADE20K scene parsing (SceneParsing 150 classes) from the ``ADEChallengeData2016`` folder layout."""
    folder = _ade_folder(root)
    official = "validation" if _official_split(split) == "val" else "training"
    images = sorted((folder / "images" / official).glob("*.jpg"))
    pairs = [(p, folder / "annotations" / official / f"{p.stem}.png") for p in images]
    pairs = [p for p in pairs if p[1].is_file()]
    if not pairs:
        raise DatasetNotFoundError(
            f"no image/annotation pairs in {folder}/images/{official} and "
            f"{folder}/annotations/{official}; is the ADEChallengeData2016 download complete?"
        )
    idx = _pick(len(pairs), split, num_images, seed)
    pairs = [pairs[i] for i in idx]

    def reduce_zero_label(m: np.ndarray) -> np.ndarray:
        m = m.astype(np.int64)
        return np.where(m == 0, IGNORE_INDEX, m - 1).astype(np.uint8)

    meta = {"root": str(folder), "official_split": official}
    return _pairs_set("ade20k", split, pairs, size, reduce_zero_label, ade20k_class_names(folder), meta)


# ---------------------------------------------------------------------------------------------- registry
SEGMENTATION_SETS: dict[str, Callable[..., SegmentationSet]] = {
    "fashion_scenes": load_fashion_scenes,
    "voc": load_voc,
    "ade20k": load_ade20k,
}


def segmentation_names() -> list[str]:
    return sorted(SEGMENTATION_SETS)


def load_segmentation(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    num_images: int | None = None,
    size: int | None = None,
    seed: int = 0,
    **options,
) -> SegmentationSet:
    """One split (``train``/``val``/``test``) of a registered segmentation set.

    ``num_images``: how many images (a seeded choice for VOC/ADE20K; for scenes, how many are generated);
    ``size``: the square image size (scenes: the canvas, default 56; VOC/ADE20K: default 224); ``options``:
    loader-specific settings (scenes: ``items_per_scene``, ``threshold``; VOC: ``year``). Unknown names raise an
    error listing the valid ones; missing data raises :class:`DatasetNotFoundError` saying what to download.
    """
    check_name("segmentation dataset", name, SEGMENTATION_SETS)
    check_name("split", split, SPLITS)
    if num_images is not None and int(num_images) < 1:
        raise InputError(f"num_images must be positive, got {num_images}")
    return SEGMENTATION_SETS[name](split, root=root, num_images=num_images, size=size, seed=seed, **options)
