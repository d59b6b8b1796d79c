"""Batch augmentations for the contrastive and masked-image baselines: whole-batch tensor ops, one random draw
per image from the step ``generator`` (so a resumed run repeats them), no Python loop over images or pixels.

They follow torchvision's definitions (the ones lightly's ``SimCLRTransform``/``MAETransform`` use) with these
differences, each for batching:

* ``random_resized_crop`` draws one crop per image and samples all crops with one ``grid_sample``. A crop
  larger than the image is shrunk to fit (torchvision retries ten times and then takes a centre crop).
* ``color_jitter`` applies brightness → contrast → saturation → hue in this fixed order (torchvision shuffles
  the order per call). Hue is a rotation of the chroma plane in YIQ space, a linear stand-in for torchvision's
  HSV hue shift. Saturation and hue exist only for RGB; on grey images they are the identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=generator) * (high - low) + low).to(device)


def _coin(n: int, prob: float, generator: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=generator) < prob).to(device)


def random_resized_crop(
    images: torch.Tensor,
    generator: torch.Generator,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip_prob: float = 0.5,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Random-resized crop back to the input size, fused with a random horizontal flip: each image gets a crop
    of area fraction ``U(scale)`` and aspect ratio ``exp(U(log ratio))``, at a uniform position."""
    b, _, _, _ = images.shape
    area = torch.rand(b, generator=generator) * (scale[1] - scale[0]) + scale[0]
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    log_r = torch.rand(b, generator=generator) * (hi - lo) + lo
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)  # crop width and height as fractions of the image side
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coordinates
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, generator=generator) < hflip_prob, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp(0.0, 1.0) if mode == "bicubic" else out


def grey(images: torch.Tensor) -> torch.Tensor:
    """Luminance (B, 1, H, W) of RGB images; grey images are returned as they are."""
    if images.shape[1] != 3:
        return images
    w = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``: ``factor·a + (1 − factor)·b``, clamped to [0, 1]."""
    return (factor.view(-1, 1, 1, 1) * a + (1 - factor.view(-1, 1, 1, 1)) * b).clamp(0.0, 1.0)


def _rotate_hue(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma (I, Q) of RGB images by ``turns`` of a full circle, keeping luma Y."""
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
        device=images.device,
        dtype=torch.float32,
    )
    cos, sin = torch.cos(2 * math.pi * turns).float(), torch.sin(2 * math.pi * turns).float()
    rot = torch.zeros(len(turns), 3, 3, device=images.device)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, cos, -sin, sin, cos
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # (B, 3, 3) in RGB space
    return torch.einsum("bij,bjhw->bihw", m.to(images.dtype), images).clamp(0.0, 1.0)


def color_jitter(
    images: torch.Tensor,
    generator: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    prob: float = 0.8,
) -> torch.Tensor:
    """Colour jitter applied to each image with probability ``prob``; factors are ``U[max(0, 1−s), 1+s]``
    (hue: ``U[−hue, hue]`` of a turn), as torchvision's ``ColorJitter``. Images are in [0, 1]."""
    b, c = images.shape[:2]
    dev = images.device
    apply = _coin(b, prob, generator, dev)
    out = images
    f = _uniform(b, max(0.0, 1 - brightness), 1 + brightness, generator, dev)
    out = _blend(out, torch.zeros_like(out), f)
    f = _uniform(b, max(0.0, 1 - contrast), 1 + contrast, generator, dev)
    out = _blend(out, grey(out).mean(dim=(1, 2, 3), keepdim=True), f)
    f = _uniform(b, max(0.0, 1 - saturation), 1 + saturation, generator, dev)
    h = _uniform(b, -hue, hue, generator, dev)
    if c == 3:
        out = _blend(out, grey(out), f)
        out = _rotate_hue(out, h)
    return torch.where(apply.view(-1, 1, 1, 1), out, images)


def random_grayscale(images: torch.Tensor, generator: torch.Generator, prob: float = 0.2) -> torch.Tensor:
    """Replace each RGB image by its luminance (kept 3-channel) with probability ``prob``; grey: identity."""
    coins = _coin(images.shape[0], prob, generator, images.device)
    if images.shape[1] != 3:
        return images
    return torch.where(coins.view(-1, 1, 1, 1), grey(images).expand_as(images), images)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x − mean) / std per channel."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s
