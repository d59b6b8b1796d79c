"""What makes a learner drivable by lightly's and Lightning's own tooling: lightly's batch format, per-image
transforms for a ``LightlyDataset``, and the online evaluation lightly's benchmark modules carry (a linear
classifier on detached features, optionally kNN against a bank of training features).

Batches. Our step-indexed stream yields ``(images, labels)``: raw images in [0, 1], which the learner augments
itself with its batched transform and the step's generator (the exactly resumable path). lightly's loaders
yield ``(views, targets, filenames)``: views already made by a per-image transform
(:class:`PerImageTransform`), a tensor or a list of tensors, in the backbone's input space.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import InputError
from ..runtime import similarity_dtype


def unpack_batch(batch) -> tuple[torch.Tensor | None, torch.Tensor | list | None, torch.Tensor | None]:
    """``(raw_images, views, targets)`` of a batch: ours ``(images, labels)`` gives raw images and no views;
    lightly's ``(views, targets, filenames)`` gives views and no raw images; a bare tensor gives raw images."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if not isinstance(batch, (list, tuple)) or len(batch) not in (2, 3):
        raise InputError(
            f"a batch must be (images, labels) or lightly's (views, targets, filenames), got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
        )
    if len(batch) == 3:
        return None, batch[0], batch[1]
    return batch[0], None, batch[1]


def first_view(views: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The first view of lightly-style views (a list of tensors, or one tensor)."""
    return views if isinstance(views, torch.Tensor) else views[0]


def to_float_image(image) -> torch.Tensor:
    """A PIL image, a uint8 tensor (C, H, W)/(H, W) or a float tensor in [0, 1] as float (C, H, W) in [0, 1]."""
    if not isinstance(image, torch.Tensor):
        from torchvision.transforms.functional import pil_to_tensor

        image = pil_to_tensor(image)
    if image.dim() == 2:
        image = image[None]
    return image.float().div(255.0) if image.dtype == torch.uint8 else image.float()


class PerImageTransform:
    """A learner's batched transform applied to one image: usable as a ``LightlyDataset``/torchvision transform.

    Each call draws its own generator seed from torch's global RNG (the convention of torchvision transforms,
    which Lightning and the DataLoader seed per worker), so this path is random like lightly's, not
    step-seeded: exact resume is a property of the step-indexed path (``pretrain``). Multi-view transforms
    (output ``(V, 1, C, H, W)``) return a list of ``V`` views, as lightly's multi-view transforms do.
    """

    def __init__(self, batch_transform: Callable[..., torch.Tensor], random: bool = True):
        self.batch_transform, self.random = batch_transform, random

    def __call__(self, image) -> torch.Tensor | list[torch.Tensor]:
        x = to_float_image(image)[None]
        if self.random:
            seed = int(torch.randint(0, 2**62, ()))
            out = self.batch_transform(x, torch.Generator().manual_seed(seed))
        else:
            out = self.batch_transform(x)
        return list(out[:, 0]) if out.dim() == 5 else out[0]

    def __repr__(self) -> str:
        return f"PerImageTransform({getattr(self.batch_transform, '__name__', self.batch_transform)!r})"


class eval_mode:
    """Puts a module in eval mode (no dropout, running batch-norm statistics) and restores its mode."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self) -> nn.Module:
        self.was_training = self.module.training
        return self.module.eval()

    def __exit__(self, *exc) -> None:
        self.module.train(self.was_training)


class FeatureBank:
    """lightly's online kNN monitor: features of validation loader 0 (the kNN train set) form the bank, the
    queries of loader 1 are classified with :func:`lightly.utils.benchmarking.knn_predict` (cosines in
    :func:`~diffssl_plugin.runtime.similarity_dtype`, as the harness's kNN)."""

    def __init__(self):
        self.features: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset(self) -> None:
        self.features, self.labels, self._bank = [], [], None

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features.append(nn.functional.normalize(features.to(similarity_dtype(features.device)), dim=1))
        self.labels.append(labels)

    def bank(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, N) normalised features and (N,) labels, gathered from every process."""
        if self._bank is None:
            if not self.features:
                raise InputError("kNN needs a bank: pass [knn_train_loader, val_loader] as validation loaders")
            feats, labels = torch.cat(self.features), torch.cat(self.labels)
            feats, labels = gather(feats), gather(labels)
            self._bank = (feats.reshape(-1, feats.shape[-1]).t().contiguous(), labels.reshape(-1))
        return self._bank
