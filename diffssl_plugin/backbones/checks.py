"""Input checks shared by every backbone, in two parts:

* :func:`check_images`: type, shape, channel count, image size and dtype. Metadata only, no host sync, so every
  forward runs it (and ``torch.compile(fullgraph=True)`` traces it);
* :func:`check_values`: NaN/inf and the value range. These read the data (one device-to-host copy), so they stay
  out of the forward: run them once per dataset (``backbone.check_inputs(x)`` on a batch), or in every forward
  with ``backbone.strict_inputs = True`` or the environment variable ``DIFFSSL_STRICT_INPUTS=1``.
"""

from __future__ import annotations

import os

import torch

from ..errors import InputError

#: the default of every backbone's ``strict_inputs`` (value checks in every forward), set by DIFFSSL_STRICT_INPUTS
STRICT_INPUTS = os.environ.get("DIFFSSL_STRICT_INPUTS", "").strip().lower() not in ("", "0", "false", "no")


def check_images(x: torch.Tensor, channels: int, image_size: int | None = None, name: str = "backbone") -> None:
    """Raise :class:`InputError` naming the problem if ``x`` is not a floating (B, C, H, W) batch of ``channels``
    channels (and ``image_size``² pixels) for ``name``. Reads no values: no host sync."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} expects a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"{name} expects images of shape (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise InputError(f"{name} expects {channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        raise InputError(
            f"{name} expects {image_size}×{image_size} images, got {x.shape[-2]}×{x.shape[-1]}; "
            "resize them, or build the model with dynamic_img_size=True"
        )
    if not x.is_floating_point():
        raise InputError(f"{name} expects floating-point images, got {x.dtype}; convert and normalise them first")


def check_values(
    x: torch.Tensor, value_range: tuple[float, float] | None = None, tolerance: float = 1e-3, name: str = "backbone"
) -> None:
    """Raise :class:`InputError` if ``x`` holds NaN or inf, or (with ``value_range``) values outside
    ``[lo, hi]`` by more than ``tolerance``. One host sync: run it once per dataset, not in a forward."""
    if not x.numel():
        return
    finite, lo_seen, hi_seen = torch.stack(
        [torch.isfinite(x).all().float(), x.amin().float(), x.amax().float()]
    ).tolist()
    if not finite:
        raise InputError(f"{name} got NaN or inf in its input")
    if value_range is not None:
        lo, hi = value_range
        if lo_seen < lo - tolerance or hi_seen > hi + tolerance:
            raise InputError(
                f"{name} expects values in [{lo:g}, {hi:g}], got [{lo_seen:.3g}, {hi_seen:.3g}]; "
                "normalise with the model's mean/std (timm.data.resolve_model_data_config)"
            )


def check_model_inputs(model: torch.nn.Module, x: torch.Tensor, values: bool = True) -> None:
    """Check a batch for any backbone once (e.g. the first batch of a dataset): ``model.check_inputs`` where the
    model has it (our backbones: metadata, and with ``values`` NaN/inf and the range it reads), else NaN/inf."""
    if hasattr(model, "check_inputs"):
        model.check_inputs(x, values=values)
    elif values and isinstance(x, torch.Tensor) and x.is_floating_point():
        check_values(x, None, name=type(model).__name__)
