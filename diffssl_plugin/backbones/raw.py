"""The floor of every leaderboard: the image's own pixels, flattened, as the feature vector."""

from __future__ import annotations

import torch
from torch import nn

from .timm_contract import TimmBackboneMixin, create_backbone, data_cfg


class RawPixels(TimmBackboneMixin, nn.Module):
    """Flattened pixels in [0, 1] (timm contract; no parameters besides an optional classifier, so gradient
    checkpointing has nothing to recompute)."""

    input_range = (0.0, 1.0)
    timm_family = "raw_pixels"

    def __init__(
        self, in_chans: int = 1, img_size: int = 28, num_classes: int = 0, global_pool: str | None = None, **kwargs
    ):
        super().__init__()
        kwargs.pop("pretrained_cfg", None)
        self.in_chans, self.image_size = in_chans, img_size
        self.pretrained_cfg = self.data_cfg()
        self.feature_info = [{"num_chs": in_chans, "reduction": 1, "module": ""}]
        self.reset_classifier(num_classes)

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


# ---------------------------------------------------------------------- timm registration
# timm reads ``default_cfgs`` when the ``@register_model`` functions below are decorated, so it stands above them.
from timm.models import generate_default_cfgs, register_model  # noqa: E402

default_cfgs = generate_default_cfgs({"raw_pixels.fmnist": data_cfg(1, 28, RawPixels.input_range, first_conv="")})


@register_model
def raw_pixels(pretrained: bool = False, **kwargs) -> RawPixels:
    """Flattened pixels: the floor row of every leaderboard (``in_chans=``, ``img_size=`` for other data)."""
    return create_backbone(RawPixels, "raw_pixels", pretrained, **kwargs)
