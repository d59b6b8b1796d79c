"""MDSM's energy network (Li, Chen & Sommer, arXiv 1910.07762): a ResNet with a quadratic output, read both as an
energy ``E(x)`` and, through timm's contract, as a feature backbone (its penultimate activations).

Architecture (the official ``models/ResNet.py``, ``Res12_Quadratic`` / ``Res18_Quadratic``):

* a 3×3 conv stem ``in_chans → width`` (with bias);
* three stages; each opens with a down block ``c → 2c`` (halving the map) and adds ``blocks_per_stage - 1``
  blocks at ``2c``; a block is ``shortcut(x) + conv2(ELU(conv1(ELU(x))))`` with no normalisation, ``conv1`` a
  3×3 conv without bias that keeps the channels, ``conv2`` a 3×3 conv to the output channels (then a 2×2
  mean-pool in down blocks); the shortcut is a 1×1 conv after a 2×2 mean-pool in down blocks, and a 1×1 conv in
  the others too (the official code always takes that branch, even at equal channels);
* ``h`` = the last map flattened (``8·width·(net_size/8)²`` values) and the quadratic output
  ``E = (w1·h + b1)(w2·h + b2) + w3·(h⊙h) + b3``.

Presets (:data:`EBM_PRESETS`): ``res12`` (two blocks per stage, width 64, 1 channel) is the paper's
Fashion-MNIST/MNIST network, ``res18`` (three per stage, width 128, 3 channels) its CIFAR-10 network.
(Res12 has six residual blocks, i.e. twelve 3×3 convs in the residual paths; ``papers.md`` §4.3 says "one block
per stage", which is ``Res6_Quadratic``; we follow ``Res12_Quadratic`` as the training script does.)
``width`` is an argument so CPU runs can use a thinner network.

Input: images in [0, 1] (the paper's ``ToTensor`` data), so ``pretrained_cfg`` has mean 0 and std 1. The official
Fashion-MNIST loader pads 28×28 images with 2 zero pixels to 32×32 *before* noise is added, so the training loss
and the samplers cover the border too. We follow that order: :meth:`EnergyResNet.energy` takes images of either
``net_size`` (already padded, possibly noised: used as they are) or ``img_size`` (clean images: zero-padded
inside, which is exactly the loader's padding); MDSM's training pads before noising
(:meth:`EnergyResNet.pad_input`), and samplers run at :attr:`EnergyResNet.sample_size` (= ``net_size``). The timm
feature interface reads ``img_size`` images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import InputError, check_name
from .checks import check_images, check_values
from .pooling import pool_cells, pool_features
from .timm_contract import TimmBackboneMixin, create_backbone, data_cfg

EBM_PRESETS: dict[str, dict] = {
    # the paper's Fashion-MNIST / MNIST network: Res12_Quadratic(1, 64, 32), 28×28 images padded to 32×32
    "res12": {"width": 64, "blocks_per_stage": 2, "in_chans": 1, "img_size": 28, "net_size": 32},
    # the paper's CIFAR-10 network: Res18_Quadratic(3, 128, 32)
    "res18": {"width": 128, "blocks_per_stage": 3, "in_chans": 3, "img_size": 32, "net_size": 32},
}

POOLS = "'flatten' (the penultimate layer h itself), 'avg', 'avgKxK' or '' / 'none' (the map)"


class EnergyResBlock(nn.Module):
    """Pre-activation residual block without normalisation: ``shortcut(x) + conv2(ELU(conv1(ELU(x))))``."""

    def __init__(self, in_chs: int, out_chs: int, down: bool):
        super().__init__()
        self.down = down
        self.act = nn.ELU()
        self.conv1 = nn.Conv2d(in_chs, in_chs, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(in_chs, out_chs, 3, padding=1)
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.act(self.conv1(self.act(x))))
        if self.down:  # conv then mean-pool on the main path, mean-pool then conv on the shortcut
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        return self.shortcut(x) + h


class QuadraticEnergyHead(nn.Module):
    """``E(h) = (w1·h + b1)(w2·h + b2) + w3·(h⊙h) + b3``, one scalar per image, in the weights' precision
    (float32 under bf16 autocast)."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin1, self.lin2, self.quad = nn.Linear(dim, 1), nn.Linear(dim, 1), nn.Linear(dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):  # a sum over thousands of terms: keep it in fp32
            h = h.to(self.quad.weight.dtype)
            return (self.lin1(h) * self.lin2(h) + self.quad(h * h)).squeeze(-1)


class EnergyResNet(TimmBackboneMixin, nn.Module):
    """MDSM's energy network; ``energy(x)`` is ``E(x)``, the timm interface gives its penultimate features.

    Args:
        width: channels of the stem; the stages have 2·, 4·, 8· ``width``.
        blocks_per_stage: 2 for Res12 (Fashion-MNIST), 3 for Res18 (CIFAR-10).
        in_chans: image channels.
        img_size: input image size (28 for Fashion-MNIST); images are zero-padded to ``net_size`` inside.
        net_size: the size the network works at (32 in the paper); a multiple of 8.
        num_classes: 0 for a feature extractor (timm convention), else a linear classifier on the features.
        global_pool: how ``forward_head`` turns the last map into a vector: ``"flatten"`` (default: ``h``, the
            vector the energy head reads), ``"avg"``, ``"avgKxK"``, or ``""``/``"none"`` (keep the map).
        drop_rate: dropout before the classifier.
    """

    input_range = (0.0, 1.0)  # the paper's ToTensor images (check_inputs)
    #: computes in fp32 under autocast too (see ``_trunk``); evaluation records say so
    computes_in_fp32 = True
    #: runs ~2× faster in channels-last on CPUs (``backbones/memory_format.py``)
    prefers_channels_last = True
    timm_family = "mdsm_ebm"
    first_conv = "stem"

    def __init__(
        self,
        width: int = 64,
        blocks_per_stage: int = 2,
        in_chans: int = 1,
        img_size: int = 28,
        net_size: int = 32,
        num_classes: int = 0,
        global_pool: str = "flatten",
        drop_rate: float = 0.0,
        **kwargs,
    ):
        super().__init__()
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        if kwargs:
            raise TypeError(f"EnergyResNet got unexpected arguments: {sorted(kwargs)}")
        if net_size % 8 or net_size < img_size or (net_size - img_size) % 2:
            raise InputError(
                f"net_size {net_size} must be a multiple of 8, at least img_size {img_size}, "
                "and differ from it by an even number of pixels"
            )
        if width < 1 or blocks_per_stage < 1:
            raise InputError(f"width ({width}) and blocks_per_stage ({blocks_per_stage}) must be positive")
        self.width, self.blocks_per_stage = width, blocks_per_stage
        self.in_chans, self.img_size, self.net_size = in_chans, img_size, net_size
        self.pad = (net_size - img_size) // 2
        self.drop_rate = drop_rate
        self.stem = nn.Conv2d(in_chans, width, 3, padding=1)
        stages, chs = [], width
        for _ in range(3):
            blocks = [EnergyResBlock(chs, 2 * chs, down=True)]
            blocks += [EnergyResBlock(2 * chs, 2 * chs, down=False) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            chs *= 2
        self.stages = nn.ModuleList(stages)
        self.final_chs, self.final_size = chs, net_size // 8
        self.energy_head = QuadraticEnergyHead(chs * self.final_size**2)
        self.pretrained_cfg = self.data_cfg()
        self.feature_info = [{"num_chs": width, "reduction": 1, "module": "stem"}] + [
            {"num_chs": width * 2 ** (i + 1), "reduction": 2 ** (i + 1), "module": f"stages.{i}"} for i in range(3)
        ]
        self.reset_classifier(num_classes, global_pool)

    # ------------------------------------------------------------------ the network
    @property
    def image_size(self) -> int:
        return self.img_size

    @property
    def sample_size(self) -> int:
        """The side of the images samplers should draw (``net_size``): the official order pads, then noises."""
        return self.net_size

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """``img_size`` images zero-padded to ``net_size`` (the official loader's padding); ``net_size`` images
        are returned as they are."""
        return F.pad(x, (self.pad,) * 4) if self.pad and x.shape[-1] == self.img_size else x

    def _trunk(self, x: torch.Tensor, last: int = 3) -> list[torch.Tensor]:
        """Maps after the stem and after each stage, up to level ``last`` (0 = stem, 3 = last stage).

        Always in the weights' precision (fp32), also under autocast: a trained MDSM's maps are a small
        image-dependent signal on a large offset shared by all images (the pooled last map of a 10-minute
        Fashion-MNIST run: every row at cosine 1.0000 with the mean row, per-dimension spread ~0.01 on values
        up to ~90), below bf16's resolution there. Its features extracted under bf16 autocast scored 60.8% linear
        against 74.3% in fp32 (600 / 300 / 400 images); so the energy, its score and the features are computed
        in fp32 on every device."""
        with torch.autocast(x.device.type, enabled=False):
            h = self.stem(self.pad_input(x.to(self.stem.weight.dtype)))
            maps = [h]
            for stage in self.stages[:last]:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    h = checkpoint(stage, h, use_reentrant=False)
                else:
                    h = stage(h)
                maps.append(h)
        return maps

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """``E(x)``, shape (B,), float32. ``x`` may lie outside [0, 1] (noisy or partly sampled images); it is
        ``net_size``² (padded before any noise, as the official code does) or ``img_size``² (clean: padded here)."""
        size = self.net_size if x.dim() == 4 and x.shape[-1] == self.net_size else self.img_size
        check_images(x, self.in_chans, size, name=type(self).__name__)
        if self.strict_inputs:
            check_values(x, None, name=type(self).__name__)
        return self.energy_head(self._trunk(x)[-1].flatten(1))

    def score(self, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """``-∇_x E(x)``, the model's score (see :func:`diffssl_plugin.diffusion.energy.energy_grad`)."""
        from ..diffusion.energy import energy_grad

        return -energy_grad(self.energy, x, create_graph=create_graph)[1]

    # ------------------------------------------------------------------ timm contract
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer groups in forward order: the stem, then each stage (fine: each residual block); the
        energy head, like a classifier, comes last."""
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)"}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            pool = global_pool or "none"
            if pool not in ("flatten", "none"):
                try:
                    pool_cells(pool)
                except InputError:
                    raise InputError(f"unknown global_pool {global_pool!r}; valid: {POOLS}") from None
            self.global_pool = pool
        self.num_classes = num_classes
        if self.global_pool == "flatten":
            self.num_features = self.final_chs * self.final_size**2
        elif self.global_pool == "none":
            self.num_features = self.final_chs
        else:
            self.num_features = self.final_chs * pool_cells(self.global_pool)
        self.head_drop = nn.Dropout(self.drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map (B, 8·width, net_size/8, net_size/8): ``h`` before flattening."""
        self._check(x)
        return self._trunk(x)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "flatten":
            x = x.flatten(1)
        elif self.global_pool != "none":
            x = pool_features(x, self.global_pool)
        return x if pre_logits else self.head(self.head_drop(x))

    def _intermediates(
        self, x: torch.Tensor, take: list[int], last: int | None, final: bool
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """timm's intermediate maps over :attr:`feature_info` (stem, then the three stages)."""
        self._check(x)
        maps = self._trunk(x, last=3 if last is None else last)
        return maps[-1], [maps[i] for i in take]

    # ------------------------------------------------------------------ construction helpers
    def model_args(self) -> dict:
        """Arguments that rebuild this network (written to timm's ``config.json`` on export)."""
        return {
            "width": self.width,
            "blocks_per_stage": self.blocks_per_stage,
            "in_chans": self.in_chans,
            "img_size": self.img_size,
            "net_size": self.net_size,
            "global_pool": self.global_pool,
        }

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> EnergyResNet:
        """Build a preset of :data:`EBM_PRESETS` (``res12``, ``res18``), with any argument overridden."""
        return cls(**{**EBM_PRESETS[check_name("EBM preset", preset, EBM_PRESETS)], **overrides})


# ---------------------------------------------------------------------- timm registration
# timm reads ``default_cfgs`` when the ``@register_model`` functions below are decorated, so it stands above them.
from timm.models import generate_default_cfgs, register_model  # noqa: E402

_PAPER = {"first_conv": EnergyResNet.first_conv, "paper_ids": "arXiv:1910.07762"}
default_cfgs = generate_default_cfgs(
    {
        "mdsm_ebm_fmnist.untrained": data_cfg(
            1, 28, (0.0, 1.0), **_PAPER, description="MDSM Res12 quadratic energy ResNet, 28×28 grey padded to 32×32"
        ),
        "mdsm_ebm_cifar10.untrained": data_cfg(
            3, 32, (0.0, 1.0), **_PAPER, description="MDSM Res18 quadratic energy ResNet for CIFAR-10"
        ),
    }
)


@register_model
def mdsm_ebm_fmnist(pretrained: bool = False, **kwargs) -> EnergyResNet:
    """MDSM's Fashion-MNIST energy network (Res12, width 64; pass ``width=`` for a thinner CPU network)."""
    return create_backbone(EnergyResNet, "mdsm_ebm_fmnist", pretrained, **{**EBM_PRESETS["res12"], **kwargs})


@register_model
def mdsm_ebm_cifar10(pretrained: bool = False, **kwargs) -> EnergyResNet:
    """MDSM's CIFAR-10 energy network (Res18, width 128)."""
    return create_backbone(EnergyResNet, "mdsm_ebm_cifar10", pretrained, **{**EBM_PRESETS["res18"], **kwargs})
