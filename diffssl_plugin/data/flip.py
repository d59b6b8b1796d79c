"""The one random horizontal flip of the package: DDAE's and DRL's training augmentation and fine-tuning's
optional flips. Whole-batch tensor ops, one coin per image from a CPU generator (so a seeded run repeats)."""

from __future__ import annotations

import torch


def flip_coins(n: int, generator: torch.Generator, prob: float = 0.5) -> torch.Tensor:
    """``n`` coins on the CPU, True with probability ``prob``: which images :func:`hflip` mirrors."""
    return torch.rand(n, generator=generator) < prob


def hflip(
    images: torch.Tensor, generator: torch.Generator | None = None, coins: torch.Tensor | None = None
) -> torch.Tensor:
    """Mirror the images of a (B, C, H, W) batch whose coin is True: ``coins`` if given (drawn earlier, e.g.
    in an epoch plan), else one coin per image drawn from ``generator`` (:func:`flip_coins`)."""
    if coins is None:
        if generator is None:
            raise TypeError("hflip needs a generator to draw its coins, or the coins")
        coins = flip_coins(images.shape[0], generator)
    return torch.where(coins.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)
