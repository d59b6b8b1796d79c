"""Input checks shared by every backbone: shape, channel count, image size, value range, NaN/inf."""

from __future__ import annotations

import torch

from ..errors import InputError


def check_images(x: torch.Tensor, channels: int, image_size: int | None = None,
                 value_range: tuple[float, float] | None = None, tolerance: float = 1e-3,
                 name: str = "backbone") -> None:
    """Raise :class:`InputError` naming the problem if ``x`` is not a valid (B, C, H, W) batch for ``name``."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} expects a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"{name} expects images of shape (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise InputError(f"{name} expects {channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        raise InputError(f"{name} expects {image_size}×{image_size} images, got {x.shape[-2]}×{x.shape[-1]}; "
                         "resize them, or build the model with dynamic_img_size=True")
    if not x.is_floating_point():
        raise InputError(f"{name} expects floating-point images, got {x.dtype}; convert and normalise them first")
    if not torch.isfinite(x).all():
        raise InputError(f"{name} got NaN or inf in its input")
    if value_range is not None and x.numel():
        lo, hi = value_range
        xmin, xmax = x.min().item(), x.max().item()
        if xmin < lo - tolerance or xmax > hi + tolerance:
            raise InputError(f"{name} expects values in [{lo:g}, {hi:g}], got [{xmin:.3g}, {xmax:.3g}]; "
                             "normalise with the model's mean/std (timm.data.resolve_model_data_config)")
