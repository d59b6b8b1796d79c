"""Sampling through diffusers' pipelines (DDIM or ancestral DDPM) and a PNG grid of the samples."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from ..errors import check_name
from ..io import atomic_path


@torch.no_grad()
def sample_images(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    num_images: int = 64,
    steps: int = 50,
    sampler: str = "ddim",
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Draw ``num_images`` samples in [0, 1], shape (N, C, H, W). ``sampler``: ``"ddim"`` (η=0) or ``"ddpm"``."""
    check_name("sampler", sampler, ("ddim", "ddpm"))
    if sampler == "ddim":
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))
        kwargs = {"num_inference_steps": steps, "eta": 0.0}
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler.config))
        kwargs = {"num_inference_steps": steps}
    pipe.set_progress_bar_config(disable=not progress, desc="sampling")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = pipe(batch_size=num_images, generator=gen, output_type="np", **kwargs).images  # (N, H, W, C) in [0,1]
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Write images in [0, 1] as one PNG grid, atomically."""
    from torchvision.utils import save_image

    path = Path(path)
    with atomic_path(path) as tmp:
        save_image(images.float().clamp(0, 1), tmp, nrow=nrow, padding=1, format="png")
    return path
