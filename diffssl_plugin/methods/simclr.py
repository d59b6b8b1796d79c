"""SimCLR: a simple framework for contrastive learning of visual representations (Chen et al., ICML 2020),
built from lightly's blocks at lightly's CIFAR-10 benchmark settings.

    repeat
        x ~ data;  two augmented views v₀ = aug(x), v₁ = aug(x)
        h = f(v)        ResNet-18, CIFAR stem (backbone, kept)
        z = g(h)        SimCLRProjectionHead(512, 512, 128) (thrown away after pretraining)
        take a gradient step on NT-Xent(z₀, z₁), temperature τ
    until the budget is spent

Settings from lightly's CIFAR-10 benchmark: ``NTXentLoss()`` (its default τ = 0.5), SGD with momentum 0.9,
lr 0.06·batch/128, weight decay 5e-4, cosine schedule (over the step budget when it is known; constant when
the budget is wall-clock minutes), no warm-up.

Augmentations (``SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)``, made batch-wise, see
:mod:`~diffssl_plugin.methods.augment`): random-resized crop to the input size with area in [0.08, 1] and a
horizontal flip; with probability 0.8 colour jitter of strength 0.5 (brightness 0.4, contrast 0.4,
saturation 0.4, hue 0.1); random greyscale with probability 0.2. **On grey images** (Fashion-MNIST) only
brightness and contrast jitter remain: saturation, hue and greyscale conversion do nothing to a single
channel, so they are left out, not approximated. **No Gaussian blur**: lightly switches it off for 32-pixel
CIFAR images, where a blur removes most of the little detail there is; 28-pixel images are smaller still.

Our choice where lightly gives none: both views go through the backbone in one batch (one forward of 2B
images: larger matrix products on the CPU; batch norm then normalises over both views together, as SimCLR's
global batch norm does). Width: lightly's full ResNet-18 by default (5.5 training GFLOP per image pair at
28 px; on 2 CPU cores with bf16 autocast about 64 pairs/s, ``benchmarks/baselines_throughput.py``).
``backbone_args`` sets another: the bench's CPU presets use half width (channels 32-256, 1.5 GFLOP per pair),
because on a 2-core CPU without bf16 hardware the full width makes ~50 steps in 2.5 minutes (see
:mod:`diffssl_plugin.presets`).
"""

from __future__ import annotations

import functools

import timm
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead

from ..backbones.baselines import CifarResNet, norm_stats
from ..errors import InputError
from .augment import color_jitter, normalize, random_grayscale, random_resized_crop
from .base import SSLMethod


def simclr_view(
    images: torch.Tensor,
    generator: torch.Generator,
    min_scale: float = 0.08,
    cj_strength: float = 0.5,
    cj_prob: float = 0.8,
    gray_prob: float = 0.2,
) -> torch.Tensor:
    """One SimCLR view of a batch in [0, 1], normalised with the backbone's mean/std."""
    s = cj_strength
    x = random_resized_crop(images, generator, scale=(min_scale, 1.0))
    x = color_jitter(x, generator, brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=0.2 * s, prob=cj_prob)
    x = random_grayscale(x, generator, prob=gray_prob)
    return normalize(x, *norm_stats(images.shape[1]))


def simclr_transform(
    images: torch.Tensor, generator: torch.Generator, min_scale: float = 0.08, cj_strength: float = 0.5
) -> torch.Tensor:
    """Two independent SimCLR views of a batch in [0, 1], stacked: (2, B, C, H, W)."""
    views = [simclr_view(images, generator, min_scale=min_scale, cj_strength=cj_strength) for _ in range(2)]
    return torch.stack(views)


def simclr_eval_transform(images: torch.Tensor) -> torch.Tensor:
    """Evaluation input of the ResNet: images in [0, 1] normalised with the backbone's mean/std."""
    return normalize(images, *norm_stats(images.shape[1]))


class SimCLR(SSLMethod):
    """SimCLR: a CIFAR-stem ResNet-18 (``simclr_resnet18_cifar``), lightly's projection head and NT-Xent."""

    transform = staticmethod(simclr_transform)
    eval_transform = staticmethod(simclr_eval_transform)
    timm_architecture = "simclr_resnet18_cifar"

    def __init__(
        self,
        batch_size_per_device: int = 128,
        num_classes: int = 10,
        knn_k: int | None = None,
        knn_t: float | None = None,
        temperature: float = 0.5,
        lr: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_steps: int = 0,
        projection_dim: int = 128,
        backbone_args: dict | None = None,
        seed: int = 0,
        in_chans: int = 1,
        online_classifier: bool = True,
        min_scale: float = 0.08,
        cj_strength: float = 0.5,
    ):
        super().__init__(
            batch_size_per_device,
            num_classes,
            knn_k,
            knn_t,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            seed=seed,
            online_classifier=online_classifier,
        )
        self.save_hyperparameters()
        self.momentum = momentum
        if (min_scale, cj_strength) != (0.08, 0.5):  # augmentation strength other than lightly's CIFAR-10 setting
            self.transform = functools.partial(simclr_transform, min_scale=min_scale, cj_strength=cj_strength)
        self.resnet: CifarResNet = timm.create_model(
            self.timm_architecture, in_chans=in_chans, num_classes=0, **(backbone_args or {})
        )
        width = self.resnet.num_features
        self.projection_head = SimCLRProjectionHead(width, width, projection_dim)
        # negatives from every process under DDP (lightly's benchmarks); a no-op in a single process
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=torch.distributed.is_available())
        self.init_online_classifier()

    @property
    def backbone(self) -> CifarResNet:
        return self.resnet

    def collate_views(self, views: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """lightly's two views (a list of two (B, C, H, W) tensors) stacked as ``transform`` gives them."""
        views = views if isinstance(views, torch.Tensor) else torch.stack(list(views))
        if views.dim() != 5 or views.shape[0] != 2:
            raise InputError(f"SimCLR takes two views per image, got a batch of shape {tuple(views.shape)}")
        return views

    def view_loss(self, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """NT-Xent of the projections of two views (2, B, C, H, W)."""
        h = self.resnet(views.flatten(0, 1))  # representations of both views
        z0, z1 = self.projection_head(h).chunk(2)  # projections
        return self.criterion(z0, z1)  # NT-Xent

    def configure_optimizers(self):
        trainer = self.trainer if self._trainer is not None else None
        images_per_step = self.batch_size_per_device * (
            trainer.world_size * trainer.accumulate_grad_batches if trainer else 1
        )
        lr = self.lr if self.lr is not None else 0.06 * images_per_step / 128
        opt = torch.optim.SGD(self.optimizer_groups(), lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return {"optimizer": opt, "lr_scheduler": self.lr_schedule(opt)}
