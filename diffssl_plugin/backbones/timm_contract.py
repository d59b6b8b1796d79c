"""The part of timm's backbone contract that every diffssl backbone implements the same way.

Each backbone defines ``forward_features``, ``forward_head``, ``reset_classifier``, ``feature_info`` and its
own ``forward_intermediates``; this mixin adds ``get_classifier``, ``forward``, ``prune_intermediate_layers``,
the index/format check ``forward_intermediates`` starts with, ``set_grad_checkpointing`` (a flag the backbone's
block loop reads) and the input checks (:meth:`~TimmBackboneMixin.check_inputs`: metadata in every forward, values
once per dataset, see :mod:`.checks`). Put it before ``nn.Module`` in the bases.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from .checks import STRICT_INPUTS, check_images, check_values


class TimmBackboneMixin:
    """Shared timm contract methods (see the module docstring)."""

    head: nn.Module
    feature_info: list[dict]
    in_chans: int
    image_size: int
    #: the range of the normalised images the backbone reads (``check_inputs`` checks it); None: any finite value
    input_range: tuple[float, float] | None = (-1.0, 1.0)
    #: also run the value checks (NaN/inf, range: host syncs) in every forward; default DIFFSSL_STRICT_INPUTS
    strict_inputs: bool = STRICT_INPUTS
    grad_checkpointing: bool = False

    def check_inputs(self, x: torch.Tensor, values: bool = True) -> None:
        """Raise :class:`InputError` naming the problem if ``x`` is not a batch this backbone reads: type, shape,
        channels, size and dtype, and with ``values`` NaN/inf and :attr:`input_range`. The value checks copy to
        the host, so run them once per dataset (say on its first batch); forwards check the metadata only,
        unless :attr:`strict_inputs` is set."""
        name = type(self).__name__
        check_images(x, self.in_chans, None if getattr(self, "dynamic_img_size", False) else self.image_size, name=name)
        if values:
            check_values(x, self.input_range, name=name)

    def _check(self, x: torch.Tensor) -> None:
        """The check every forward starts with: metadata, plus the values when :attr:`strict_inputs`."""
        self.check_inputs(x, values=self.strict_inputs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch for activation checkpointing: blocks recompute their activations in the backward."""
        self.grad_checkpointing = enable

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

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Keep the weights (the forward already stops after the last map requested); drop the head."""
        take, _ = self._take_indices(indices)
        if prune_head:
            self.reset_classifier(0, "")
        return take


def default_data_cfg(in_chans: int, image_size: int) -> dict:
    """The timm ``pretrained_cfg`` fields the harness reads: input size and [-1, 1] normalisation."""
    return {
        "input_size": (in_chans, image_size, image_size),
        "mean": (0.5,) * in_chans,
        "std": (0.5,) * in_chans,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "num_classes": 0,
        "first_conv": "unet.conv_in",
        "classifier": "head",
    }
