"""The floor of every leaderboard: the image's own pixels, flattened, as the feature vector."""

from __future__ import annotations

import torch
from torch import nn

from .timm_contract import TimmBackboneMixin, default_data_cfg


class RawPixels(TimmBackboneMixin, nn.Module):
    """Flattened pixels in [0, 1] (timm contract; no parameters besides an optional classifier, so gradient
    checkpointing has nothing to recompute)."""

    input_range = (0.0, 1.0)

    def __init__(
        self, in_chans: int = 1, img_size: int = 28, num_classes: int = 0, global_pool: str | None = None, **kwargs
    ):
        super().__init__()
        kwargs.pop("pretrained_cfg", None)
        self.in_chans, self.image_size = in_chans, img_size
        self.pretrained_cfg = self.data_cfg()
        self.feature_info = [{"num_chs": in_chans, "reduction": 1, "module": ""}]
        self.reset_classifier(num_classes)

    def data_cfg(self) -> dict:
        """Input size and identity normalisation for this channel count and size."""
        c = self.in_chans
        return {
            **default_data_cfg(c, self.image_size),
            "mean": (0.0,) * c,
            "std": (1.0,) * c,
            "first_conv": "",
            "classifier": "head",
        }

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.num_features = self.in_chans * self.image_size**2
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.flatten(1)
        return x if pre_logits else self.head(x)

    def forward_intermediates(
        self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW", intermediates_only=False
    ):
        feats = self.forward_features(x)
        return [feats] if intermediates_only else (feats, [feats])
