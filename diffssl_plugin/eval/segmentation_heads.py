"""Segmentation heads on dense frozen features and their metric (:mod:`diffssl_plugin.eval.segmentation` gives the
recipes): the mIoU meter, the BatchNorm + 1×1 conv head and DDPM-seg's pixel-MLP ensemble, trained through
:func:`diffssl_plugin.supervised.fit`."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.scenes import SegmentationSet
from ..errors import InputError
from ..optim import warmup_cosine
from ..runtime import Runtime
from ..supervised import fit, shuffled_batches
from .segmentation_features import FeatureStore, resize_map

logger = logging.getLogger(__name__)


#: settings of both protocols; ``EvalConfig.extra["segmentation"]`` overrides them key by key
def mean_iou(preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> float:
    """mIoU of integer label maps: torchmetrics' ``MulticlassJaccardIndex(average="macro")``."""
    from torchmetrics.classification import MulticlassJaccardIndex

    metric = MulticlassJaccardIndex(num_classes=num_classes, average="macro", ignore_index=ignore_index)
    return float(metric(preds.long(), target.long()))


class IoUMeter:
    """Accumulates predictions batch by batch: macro mIoU (the record's value) and per-class IoU."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        from torchmetrics.classification import MulticlassJaccardIndex

        # inputs are checked here once, not by torchmetrics at every batch (its checks sort every pixel)
        kw = {"num_classes": num_classes, "ignore_index": ignore_index, "validate_args": False}
        self.macro = MulticlassJaccardIndex(average="macro", **kw)
        self.per_class = MulticlassJaccardIndex(average="none", **kw)
        self.counts = torch.zeros(num_classes, dtype=torch.long)
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        preds, target = preds.long().cpu().flatten(), target.long().cpu().flatten()
        keep = target != self.ignore_index
        if (
            preds.shape != target.shape
            or (preds < 0).any()
            or (preds >= self.num_classes).any()
            or (target[keep] < 0).any()
            or (target[keep] >= self.num_classes).any()
        ):
            raise InputError(
                f"predictions and masks must be label maps of one shape with values in "
                f"[0, {self.num_classes}) (masks may also hold {self.ignore_index})"
            )
        self.macro.update(preds, target)
        self.per_class.update(preds, target)
        self.counts += torch.bincount(torch.cat([preds[keep], target[keep]]), minlength=self.num_classes)

    def miou(self) -> float:
        return float(self.macro.compute())

    def class_iou(self) -> list[float | None]:
        """IoU per class; None for a class in neither truth nor prediction (left out of the mean)."""
        values = self.per_class.compute().tolist()
        return [round(v, 5) if n else None for v, n in zip(values, self.counts.tolist())]


# ---------------------------------------------------------------------------------------------- linear head
class LinearSegHead(nn.Module):
    """DINOv2's ``BNHead``: ``BatchNorm2d`` then a 1×1 conv; logits upsampled bilinearly to the mask size."""

    def __init__(self, in_channels: int, num_classes: int, prior: torch.Tensor | None = None):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        if prior is not None:  # start by predicting the class prior (see train_linear_head)
            with torch.no_grad():
                self.classifier.weight.zero_()
                self.classifier.bias.copy_(prior.clamp_min(1e-6).log())

    def forward(self, features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        logits = self.classifier(self.norm(features))
        return logits if size is None else F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_head(
    head: LinearSegHead,
    store: FeatureStore,
    size: tuple[int, int],
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> Iterator[torch.Tensor]:
    """uint8 label maps (B, H, W) batch by batch, on ``device`` (default: the head's)."""
    head.eval()
    device = device if device is not None else head.classifier.weight.device
    for start in range(0, len(store), batch_size):
        f = store.get(range(start, min(len(store), start + batch_size))).to(device)
        yield head(f, size).argmax(1).to(torch.uint8).cpu()


def evaluate_head(
    head: LinearSegHead,
    store: FeatureStore,
    data: SegmentationSet,
    device: str | torch.device | None = None,
    keep: int = 0,
) -> tuple[IoUMeter, torch.Tensor]:
    """The head's IoU on ``data``, and its predictions for the first ``keep`` images."""
    meter = IoUMeter(data.num_classes, data.ignore_index)
    kept, start = [], 0
    for preds in predict_head(head, store, data.image_size, device=device):
        meter.update(preds, data.masks[start : start + len(preds)])
        kept.append(preds[: max(0, keep - start)])
        start += len(preds)
    return meter, torch.cat(kept)


def train_linear_head(
    train: tuple[FeatureStore, SegmentationSet],
    val: tuple[FeatureStore, SegmentationSet],
    settings: dict,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    runtime: Runtime | None = None,
) -> tuple[LinearSegHead, list[float], int]:
    """Train the head (recipe in the module docstring) with :func:`~diffssl_plugin.supervised.fit`; returns
    the best-validation head, the validation mIoU after each epoch, and the best epoch (1-based)."""
    (f_train, d_train), (f_val, d_val) = train, val
    torch.manual_seed(seed)
    # the head starts at the train pixels' class frequencies (zero weights, log-prior bias): with a few hundred
    # steps a randomly started head can end below the "predict the prior" floor (raw pixels did: mIoU 0.005)
    labels = d_train.masks[d_train.masks != d_train.ignore_index].long()
    prior = torch.bincount(labels, minlength=d_train.num_classes).float() / max(1, len(labels))
    head = LinearSegHead(f_train.dim, d_train.num_classes, prior)
    bs = int(settings["head_batch_size"])
    steps = max(1, math.ceil(len(f_train) / bs))
    epochs = int(settings["head_epochs"])
    opt = torch.optim.AdamW(head.parameters(), lr=settings["head_lr"], weight_decay=settings["head_weight_decay"])
    sched = warmup_cosine(opt, 0, epochs * steps)  # the package's one schedule: cosine, no warm-up
    plan = shuffled_batches(
        len(f_train), bs, torch.Generator().manual_seed(seed), drop_last=False, min_rows=2
    )  # batch norm needs two images

    def loss(m: LinearSegHead, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        f, y = batch  # summed over the pixels that count, divided by their number over every rank
        total = F.cross_entropy(m(f, d_train.image_size), y, ignore_index=d_train.ignore_index, reduction="sum")
        return total, (y != d_train.ignore_index).sum()

    result = fit(
        head,
        plan,
        lambda idx: (f_train.get(idx.numpy()), d_train.masks[idx].long()),
        loss,
        opt,
        sched,
        epochs=epochs,
        validate=lambda m, d: evaluate_head(m, f_val, d_val, d)[0].miou(),
        check_loss=False,
        desc="segmentation head",
        progress=progress,
        device=device,
        runtime=runtime,
    )
    curve = [round(h["val"], 5) for h in result.history]
    return head.eval(), curve, result.best_epoch


# ---------------------------------------------------------------------------------------------- pixel MLPs
class PixelMLPEnsemble(nn.Module):
    """``members`` independent per-pixel MLPs (DDPM-seg's ``pixel_classifier``) evaluated as one batched network:
    Linear(D, h1)–ReLU–BN–Linear(h1, h2)–ReLU–BN–Linear(h2, C) per member. Inputs are standardised per channel
    with ``mean``/``std`` (buffers). ``forward`` takes (M, B, D) (each member its own pixels) or (B, D)
    (shared), and returns (M, B, C) logits."""

    def __init__(self, in_dim: int, num_classes: int, members: int = 10, hidden: Sequence[int] = (128, 32)):
        super().__init__()
        dims = [in_dim, *hidden, num_classes]
        self.members = members
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(members, a, b) * 0.02) for a, b in itertools.pairwise(dims)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(members, 1, b)) for b in dims[1:])
        self.norms = nn.ModuleList(nn.BatchNorm1d(members * h) for h in hidden)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    def first_layer(self, x: torch.Tensor) -> torch.Tensor:
        """Standardisation and the first linear layer: affine, so it commutes with bilinear resizing."""
        x = (x.float() - self.mean) / self.std
        if x.dim() == 2:
            return torch.einsum("bd,mdh->mbh", x, self.weights[0]) + self.biases[0]
        return torch.bmm(x, self.weights[0]) + self.biases[0]

    def rest(self, h: torch.Tensor) -> torch.Tensor:
        """ReLU–BN–Linear for every later layer; ``h`` is (M, B, h1)."""
        m, b = h.shape[:2]
        for norm, w, bias in zip(self.norms, self.weights[1:], self.biases[1:]):
            h = torch.relu(h)
            h = norm(h.transpose(0, 1).reshape(b, -1)).view(b, m, -1).transpose(0, 1)
            h = torch.bmm(h, w) + bias
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(self.first_layer(x))


def sample_pixels(
    store: FeatureStore, data: SegmentationSet, total: int, seed: int = 0, batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """``total`` labelled pixels drawn uniformly (as evenly as possible per image), with their features
    bilinearly upsampled to the pixel: float16 (P, D) and int64 (P,). RAM: P × D × 2 bytes."""
    n = len(data)
    per_image = torch.full((n,), total // n, dtype=torch.long)
    per_image[: total % n] += 1
    gen = torch.Generator().manual_seed(seed)
    size = data.image_size
    xs, ys = [], []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        f = resize_map(store.get(idx), size).flatten(2)  # (B, D, H·W)
        for j, i in enumerate(idx):
            mask = data.masks[i].flatten().long()
            valid = torch.nonzero(mask != data.ignore_index).squeeze(1)
            pos = valid[torch.randperm(len(valid), generator=gen)[: int(per_image[i])]]
            xs.append(f[j][:, pos].t().to(torch.float16))
            ys.append(mask[pos])
    return torch.cat(xs), torch.cat(ys)


def train_mlp_ensemble(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    settings: dict,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    runtime: Runtime | None = None,
) -> PixelMLPEnsemble:
    """Train the ensemble on sampled pixels with :func:`~diffssl_plugin.supervised.fit`; each member sees its
    own shuffled order."""
    torch.manual_seed(seed)
    m = int(settings["mlp_members"])
    net = PixelMLPEnsemble(x.shape[1], num_classes, m, tuple(settings["mlp_hidden"]))
    xf = x.float()
    net.mean.copy_(xf.mean(0))
    net.std.copy_(xf.std(0).clamp_min(1e-6))
    del xf
    opt = torch.optim.Adam(net.parameters(), lr=settings["mlp_lr"])
    gen = torch.Generator().manual_seed(seed)
    bs, p = int(settings["mlp_batch_size"]), len(x)

    def plan() -> list[torch.Tensor]:  # rows: (pixel of member 1, …, pixel of member m)
        perms = torch.stack([torch.randperm(p, generator=gen) for _ in range(m)], 1)
        return [b for b in perms.split(bs) if len(b) >= 2]  # batch norm needs two pixels

    def loss(net: PixelMLPEnsemble, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        xb, yb = batch
        logits = net(xb)  # (M, b, C)
        # summed over members: each member gets the gradient it would get if trained alone
        per_pixel = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none")
        return per_pixel.view(m, -1).mean(1).sum()

    fit(
        net,
        plan,
        lambda idx: (x[idx.t()], y[idx.t()]),
        loss,
        opt,
        epochs=int(settings["mlp_epochs"]),
        check_loss=False,
        desc="pixel MLPs",
        progress=progress,
        device=device,
        runtime=runtime,
    )
    return net.eval()


@torch.no_grad()
def predict_mlp(
    net: PixelMLPEnsemble,
    store: FeatureStore,
    size: tuple[int, int],
    vote: str = "mode",
    batch_size: int = 4,
    device: str | torch.device | None = None,
) -> Iterator[torch.Tensor]:
    """uint8 label maps (B, H, W) batch by batch: first layer at feature resolution, then upsampled (on
    ``device``, default: the ensemble's)."""
    net.eval()
    device = device if device is not None else net.mean.device
    m = net.members
    for start in range(0, len(store), batch_size):
        f = store.get(range(start, min(len(store), start + batch_size))).to(device)  # (B, D, h, w)
        b, d, h, w = f.shape
        hidden = net.first_layer(f.permute(0, 2, 3, 1).reshape(-1, d))  # (M, B·h·w, h1)
        hidden = hidden.view(m, b, h, w, -1).permute(1, 0, 4, 2, 3).reshape(b, -1, h, w)
        hidden = F.interpolate(hidden, size=size, mode="bilinear", align_corners=False)  # (B, M·h1, H, W)
        hidden = hidden.view(b, m, -1, size[0] * size[1]).permute(1, 0, 3, 2).reshape(m, -1, hidden.shape[1] // m)
        logits = net.rest(hidden)  # (M, B·H·W, C)
        if vote == "mode":
            labels = logits.argmax(-1).mode(dim=0).values
        else:
            labels = logits.softmax(-1).mean(0).argmax(-1)
        yield labels.view(b, *size).to(torch.uint8).cpu()
