"""DifFormer: attention fusion of several blocks and timesteps of a frozen diffusion U-Net (diffssl, ECCV'24).

    for each timestep t of a list:
        for each block b of a list:  tokens_b = pre_layer_b(feature(t, b))   # own pre-layer per block,
                                                                            # shared across timesteps
        cls_t = transformer([CLS] + tokens_b for all b)                    # one transformer, shared across t
    logits = Linear(concat_t cls_t)

Blocks are fused inside attention, timesteps by concatenating the CLS outputs. diffssl's setting is blocks
{19, 24, 30} of ADM at t ∈ {90, 150, 300} with the attention head's sizes (D = 1024, s = 16). The pre-layer
and transformer are those of :mod:`diffssl_plugin.heads.attention`. The transformer runs once on the
timesteps stacked along the batch (the same computation as one run per timestep, fewer calls).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import InputError
from .attention import CLSTransformer, PreLayer, init_weights_vit_timm

FeatureKey = tuple[int, str]


class DifFormer(nn.Module):
    """Fusion head over ``{(timestep, block): (B, C, H, W) map}`` inputs.

    Args:
        in_shapes: ``{block: (C, H, W)}``, in the order the blocks' tokens are concatenated.
        timesteps: the timesteps fused, in the order their CLS outputs are concatenated.
        num_classes: classifier outputs.
        dim, pool_size, depth, num_heads, mlp_ratio: sizes, as for :class:`~.attention.AttentionHead`.
    """

    def __init__(
        self,
        in_shapes: Mapping[str, Sequence[int]],
        timesteps: Sequence[int],
        num_classes: int,
        dim: int = 64,
        pool_size: int = 7,
        depth: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if not in_shapes or not timesteps:
            raise InputError("DifFormer needs at least one block and one timestep")
        if len(set(timesteps)) != len(timesteps):
            raise InputError(f"DifFormer timesteps must be distinct, got {list(timesteps)}")
        self.block_names = list(in_shapes)
        self.timesteps = [int(t) for t in timesteps]
        self.pre = nn.ModuleList(PreLayer(in_shapes[b], dim, pool_size) for b in self.block_names)
        self.transformer = CLSTransformer(dim, depth, num_heads, mlp_ratio)
        self.fc = nn.Linear(dim * len(self.timesteps), num_classes)
        init_weights_vit_timm(self.fc)

    @property
    def keys(self) -> list[FeatureKey]:
        """The ``(timestep, block)`` features the head reads."""
        return [(t, b) for t in self.timesteps for b in self.block_names]

    @property
    def num_tokens(self) -> int:
        """Tokens per timestep (without CLS)."""
        return sum(p.num_tokens for p in self.pre)

    def forward_features(self, feats: Mapping[FeatureKey, torch.Tensor]) -> torch.Tensor:
        """The concatenated CLS vectors (B, T·D)."""
        missing = [k for k in self.keys if k not in feats]
        if missing:
            raise InputError(f"DifFormer needs features {missing}; got {sorted(feats)}")
        per_t = [
            torch.cat([pre(feats[(t, b)]) for pre, b in zip(self.pre, self.block_names)], dim=1) for t in self.timesteps
        ]
        batch = per_t[0].shape[0]
        cls = self.transformer(torch.cat(per_t, dim=0))  # (T·B, D), timestep-major
        return cls.view(len(self.timesteps), batch, -1).transpose(0, 1).reshape(batch, -1)

    def forward(self, feats: Mapping[FeatureKey, torch.Tensor]) -> torch.Tensor:
        return self.fc(self.forward_features(feats))
