"""The part of timm's backbone contract that every diffssl backbone implements the same way.

Each backbone defines ``forward_features``, ``forward_head``, ``reset_classifier``, ``feature_info`` and its
own ``forward_intermediates``; this mixin adds ``get_classifier``, ``forward``, ``prune_intermediate_layers``
and the index/format check ``forward_intermediates`` starts with. Put it before ``nn.Module`` in the bases.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError


class TimmBackboneMixin:
    """Shared timm contract methods (see the module docstring)."""

    head: nn.Module
    feature_info: list[dict]

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _take_indices(self, indices: int | list[int] | None, output_fmt: str = "NCHW") -> tuple[list[int], int]:
        """timm's ``feature_take_indices`` over :attr:`feature_info`; only NCHW maps are produced."""
        from timm.models._features import feature_take_indices

        if output_fmt != "NCHW":
            raise InputError(f"output_fmt {output_fmt!r} is not supported; {type(self).__name__} gives NCHW maps")
        return feature_take_indices(len(self.feature_info), indices)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Keep the weights (the forward already stops after the last map requested); drop the head."""
        take, _ = self._take_indices(indices)
        if prune_head:
            self.reset_classifier(0, "")
        return take
