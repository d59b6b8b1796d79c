"""Attention pooling of a frozen feature map (diffssl, Mukhopadhyay et al., ECCV 2024, "attention head").

For one feature map (B, C, H, W) of a frozen backbone:

    1. pre-layer: AdaptiveAvgPool2d to s × s with s = min(native size, pool_size);
                  LayerNorm over [C, s, s]; 1×1 conv C → D; the s² positions become s² tokens
    2. prepend a learnable CLS token (zero-initialised)
    3. 2 pre-norm transformer blocks (width D, 8 heads, MLP ratio 4, GELU, qkv without bias), no positional
       embedding
    4. the CLS token's output → Linear(D → classes)

The transformer blocks are timm's ``vision_transformer.Block``. Sizes: :data:`HEAD_PRESETS` ``"paper"`` is
diffssl's (D = 1024, s = 16); ``"cpu"`` (the default) suits 28×28 images and CPUs (D = 64, s = 7: a 7×7 map
gives 49 tokens). Choices the paper leaves open: no final LayerNorm after the blocks (the spec string has
none), timm's ViT initialisation (truncated normal 0.02, zero biases) for the transformer and the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

from ..errors import InputError, check_name

#: head sizes; every key is an argument of :class:`AttentionHead`
HEAD_PRESETS: dict[str, dict] = {
    "cpu": {"dim": 64, "pool_size": 7, "depth": 2, "num_heads": 8, "mlp_ratio": 4.0},
    "paper": {"dim": 1024, "pool_size": 16, "depth": 2, "num_heads": 8, "mlp_ratio": 4.0},
}


def head_preset(name: str, **overrides) -> dict:
    """The sizes of preset ``name`` with ``overrides`` applied (unknown names list the valid ones)."""
    return {**HEAD_PRESETS[check_name("head preset", name, HEAD_PRESETS)], **overrides}


def pooled_size(shape: Sequence[int], pool_size: int) -> tuple[int, int]:
    """The (h, w) a (C, H, W) map is pooled to by the pre-layer: never larger than the map itself."""
    _, h, w = shape
    return min(h, pool_size), min(w, pool_size)


class PreLayer(nn.Module):
    """One feature map → tokens: adaptive average pool, LayerNorm over [C, s, s], 1×1 conv to ``dim``.

    Takes the native map (C, H, W) or one already pooled to (C, s, s), e.g. a cached feature: pooling is
    parameter-free, so both give the same tokens.
    """

    def __init__(self, in_shape: Sequence[int], dim: int, pool_size: int):
        super().__init__()
        if len(in_shape) != 3 or min(in_shape) < 1:
            raise InputError(f"PreLayer expects a (C, H, W) input shape, got {tuple(in_shape)}")
        if pool_size < 1:
            raise InputError(f"pool_size must be ≥ 1, got {pool_size}")
        self.in_shape = tuple(int(v) for v in in_shape)
        self.size = pooled_size(self.in_shape, pool_size)
        channels = self.in_shape[0]
        self.pool = nn.AdaptiveAvgPool2d(self.size)
        self.norm = nn.LayerNorm([channels, *self.size])
        self.proj = nn.Conv2d(channels, dim, kernel_size=1)

    @property
    def num_tokens(self) -> int:
        return self.size[0] * self.size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = self.in_shape
        if x.dim() != 4 or x.shape[1] != c or tuple(x.shape[-2:]) not in ((h, w), self.size):
            raise InputError(
                f"PreLayer expects maps of shape (B, {c}, {h}, {w}) or (B, {c}, {self.size[0]}, "
                f"{self.size[1]}), got {tuple(x.shape)}"
            )
        if tuple(x.shape[-2:]) != self.size:
            x = self.pool(x)
        return self.proj(self.norm(x.float())).flatten(2).transpose(1, 2)  # (B, s², D)


class CLSTransformer(nn.Module):
    """A learnable CLS token prepended to the tokens, ``depth`` pre-norm timm blocks, the CLS output."""

    def __init__(self, dim: int, depth: int = 2, num_heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise InputError(f"the head width {dim} must be divisible by the number of heads {num_heads}")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=False) for _ in range(depth)])
        self.blocks.apply(init_weights_vit_timm)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        return self.blocks(x)[:, 0]


class AttentionHead(nn.Module):
    """diffssl's attention head on one (C, H, W) feature map: pre-layer → CLS transformer → linear.

    Args:
        in_shape: (C, H, W) of the feature map the head reads (native size).
        num_classes: classifier outputs.
        dim, pool_size, depth, num_heads, mlp_ratio: sizes (see :data:`HEAD_PRESETS`).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        dim: int = 64,
        pool_size: int = 7,
        depth: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.pre = PreLayer(in_shape, dim, pool_size)
        self.transformer = CLSTransformer(dim, depth, num_heads, mlp_ratio)
        self.fc = nn.Linear(dim, num_classes)
        init_weights_vit_timm(self.fc)

    @classmethod
    def from_preset(cls, preset: str, in_shape: Sequence[int], num_classes: int, **overrides) -> AttentionHead:
        return cls(in_shape, num_classes, **head_preset(preset, **overrides))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS vector (B, D)."""
        return self.transformer(self.pre(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
