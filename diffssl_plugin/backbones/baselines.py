"""Backbones of the non-diffusion baselines, registered with timm (after ``import diffssl_plugin``):

* ``simclr_resnet18_cifar``: ResNet-18 with the CIFAR stem (3×3 first conv, stride 1, no max-pool), as in
  lightly's CIFAR-10 benchmark; ``num_features`` 512 (global average pool of ``layer4``). Built from timm's
  own :class:`~timm.models.resnet.ResNet`, so it has timm's whole contract (``forward_intermediates``
  included).
* ``mae_vit_tiny_p4``: a ViT-Tiny (192-d, 12 blocks, 3 heads) with 4-pixel patches, so a 28×28 image is
  7×7 tokens (32×32: 8×8). It is a plain timm :class:`~timm.models.vision_transformer.VisionTransformer`;
  during MAE pretraining lightly's ``MaskedVisionTransformerTIMM`` wraps it, and what is exported is this ViT
  alone. Its pooled feature is the **class token after the final LayerNorm** (``global_pool="token"``),
  MAE's linear-probe feature and the one lightly's MAE benchmark classifies: after a 150-step CPU run it gave
  75.4% validation linear accuracy on Fashion-MNIST against 72.2% for the mean of the patch tokens. The
  harness also sweeps the patch-token maps of any block (``extract``).

Normalisation (``pretrained_cfg`` mean/std, also used by the training augmentations): ImageNet statistics, as
lightly's transforms use; for grey images their channel average, mean 0.449 and std 0.226.

Tags: ``.fmnist`` (1×28×28, the default) and ``.cifar10`` (3×32×32). Any ``in_chans`` works; the factory then
sets the matching mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import InputError, check_name
from .sdpa import cpu_math_attention
from .timm_contract import create_backbone, data_cfg

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = (0.449,), (0.226,)  # channel averages of the ImageNet statistics


def norm_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for ``in_chans`` channels: ImageNet's for RGB, their channel average otherwise."""
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return GREY_MEAN * in_chans, GREY_STD * in_chans


def _shape_cfg(in_chans: int, size: int) -> dict:
    """The ``pretrained_cfg`` fields that follow the data's shape: input size, ImageNet's normalisation."""
    mean, std = norm_stats(in_chans)
    return {"input_size": (in_chans, size, size), "mean": mean, "std": std}


def _cfg(in_chans: int, size: int, **fields) -> dict:
    return {**data_cfg(in_chans, size, **fields), **_shape_cfg(in_chans, size)}


_RESNET = {"first_conv": "conv1", "classifier": "fc", "paper_ids": "arXiv:2002.05709"}
_VIT = {
    "first_conv": "patch_embed.proj",
    "classifier": "head",
    "fixed_input_size": True,
    "paper_ids": "arXiv:2111.06377",
}

default_cfgs = generate_default_cfgs(
    {
        "simclr_resnet18_cifar.fmnist": _cfg(1, 28, **_RESNET, description="SimCLR ResNet-18, 28×28 grey"),
        "simclr_resnet18_cifar.cifar10": _cfg(3, 32, **_RESNET, description="SimCLR ResNet-18, 32×32 RGB"),
        "mae_vit_tiny_p4.fmnist": _cfg(1, 28, **_VIT, description="MAE ViT-Tiny/4, 28×28 grey"),
        "mae_vit_tiny_p4.cifar10": _cfg(3, 32, **_VIT, description="MAE ViT-Tiny/4, 32×32 RGB"),
    }
)


class CifarResNet(ResNet):
    """timm's ResNet with the CIFAR stem: ``conv1`` is a 3×3 stride-1 convolution and there is no max-pool, so
    a 28/32-pixel image reaches ``layer4`` at 4×4 (not 1×1). ``layers``/``channels`` default to ResNet-18."""

    #: runs ~1.5× faster in channels-last on CPUs (``backbones/memory_format.py``)
    prefers_channels_last = True

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        channels: Sequence[int] = (64, 128, 256, 512),
        in_chans: int = 3,
        num_classes: int = 0,
        global_pool: str = "avg",
        **kwargs,
    ):
        kwargs.pop("pretrained_cfg", None)
        super().__init__(
            BasicBlock,
            tuple(layers),
            num_classes=num_classes,
            in_chans=in_chans,
            global_pool=global_pool,
            channels=tuple(channels),
            **kwargs,
        )
        self.in_chans, self.layers, self.channels = in_chans, list(layers), list(channels)
        stem = self.bn1.num_features  # timm's plain stem is 64 channels wide, whatever ``channels`` is
        self.conv1 = nn.Conv2d(in_chans, stem, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        # the stem no longer downsamples: every reduction is 4× smaller than timm's ImageNet ResNet's
        self.feature_info = [{**f, "reduction": max(1, f["reduction"] // 4)} for f in self.feature_info]

    def model_args(self) -> dict:
        """Arguments that rebuild this backbone through ``simclr_resnet18_cifar`` (written on export)."""
        return {"layers": self.layers, "channels": self.channels}

    def data_cfg(self) -> dict:
        """Input size and normalisation for this model's channel count (a ResNet takes any size)."""
        return _shape_cfg(self.in_chans, self.pretrained_cfg["input_size"][-1])


class MAEViT(VisionTransformer):
    """timm's VisionTransformer plus what the harness sweeps over: ``block_names`` and
    ``extract(x, timesteps, blocks, pool)``, the patch tokens after block ``blocks.i`` as an NCHW map.

    ``timesteps`` is accepted for the harness's interface (a ViT has no noise level): every timestep asked for
    gets the same features, from one forward.
    """

    def __init__(self, **kwargs):
        kwargs.pop("pretrained_cfg", None)
        self._arch = {
            k: kwargs[k]
            for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "fc_norm", "class_token")
            if k in kwargs
        }
        super().__init__(**kwargs)
        self.in_chans = kwargs.get("in_chans", 3)
        self.block = self.block_names[-1]

    def forward_features(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with cpu_math_attention(x.device):
            return super().forward_features(x, *args, **kwargs)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        with cpu_math_attention(x.device):
            return super().forward_intermediates(x, *args, **kwargs)

    @property
    def block_names(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def data_cfg(self) -> dict:
        """Input size and normalisation for this model's channels and image size."""
        return _shape_cfg(self.in_chans, self.patch_embed.img_size[0])

    @property
    def sweep_grid(self) -> dict:
        """What the harness sweeps for a ViT: the pooled output (normed class token) and the patch-token maps
        of three blocks from the middle of the network to the end (a ViT has no timestep)."""
        depth = len(self.blocks)
        blocks = [f"blocks.{i}" for i in sorted({depth // 2, (3 * depth) // 4, depth - 1})]
        return {"output": True, "blocks": blocks, "timesteps": (0,)}

    def extract(
        self,
        x: torch.Tensor,
        timesteps: Sequence,
        blocks: Sequence[str],
        pool: str | None = "avg",
        with_output: bool = False,
    ) -> dict:
        """``{(t, block): features}`` for every ``t`` in ``timesteps``, from one forward that stops at the
        last block asked for. ``pool``: ``"avg"``, ``"avgKxK"`` or ``None``/``"none"`` (NCHW token maps).
        ``with_output``: the forward runs to the end and the dict also holds ``"output"``, the pooled output
        (what ``forward`` gives), so a sweep over blocks and the output costs one forward, not two."""
        from .pooling import pool_cells, pool_features

        pool = pool or "none"
        pool_cells(pool)
        for b in blocks:
            check_name("block", b, self.block_names)
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise InputError(f"MAEViT expects images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        indices = sorted({self.block_names.index(b) for b in blocks})
        if with_output:
            final, maps = self.forward_intermediates(x, indices=indices, output_fmt="NCHW")
        else:
            maps = self.forward_intermediates(
                x, indices=indices, stop_early=True, output_fmt="NCHW", intermediates_only=True
            )
        by_block = {f"blocks.{i}": pool_features(m, pool) for i, m in zip(indices, maps)}
        out: dict = {(t, b): by_block[b] for t in (timesteps or [None]) for b in blocks}
        if with_output:
            out["output"] = self.forward_head(final, pre_logits=True).flatten(1)
        return out

    def model_args(self) -> dict:
        """Arguments that rebuild this backbone through ``mae_vit_tiny_p4`` (written on export)."""
        size = self.patch_embed.img_size
        return dict(self._arch, img_size=list(size) if isinstance(size, tuple) else size, global_pool=self.global_pool)


@register_model
def simclr_resnet18_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-18 with the CIFAR stem (lightly's CIFAR-10 SimCLR backbone); 512-d average-pooled features."""
    return create_backbone(CifarResNet, "simclr_resnet18_cifar", pretrained, **kwargs)


@register_model
def mae_vit_tiny_p4(pretrained: bool = False, **kwargs) -> MAEViT:
    """ViT-Tiny with 4×4 patches (MAE's encoder); features are the normed class token (192-d)."""
    args = {"patch_size": 4, "embed_dim": 192, "depth": 12, "num_heads": 3, "global_pool": "token", "fc_norm": False}
    return create_backbone(MAEViT, "mae_vit_tiny_p4", pretrained, 3, **{**args, **kwargs})


__all__ = ["CifarResNet", "MAEViT", "mae_vit_tiny_p4", "norm_stats", "simclr_resnet18_cifar"]
