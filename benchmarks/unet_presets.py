"""How the `fmnist_small` U-Net preset was chosen: training images/s and achieved GFLOP/s of candidate
28×28 grey U-Nets (the package's mixed precision: bf16 autocast on CPUs with bf16 hardware, else fp32; batch
128), beside this run's GEMM GFLOP/s in the same dtype.

    python benchmarks/unet_presets.py --out runs/unet_presets.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

from diffssl_plugin.backbones.ddae import UNET_PRESETS
from diffssl_plugin.diffusion import ddpm_scheduler, epsilon_loss
from diffssl_plugin.runtime import mixed_precision

sys.path.insert(0, str(Path(__file__).parent))
from throughput import COMPUTE_DTYPE, PRECISION, gemm_gflops

BASE = UNET_PRESETS["fmnist_small"]
CANDIDATES = {
    "32-64-64, 1 layer, mid attention (chosen)": {},
    "32-64-64, 1 layer, no attention": {"add_attention": False},
    "64-128-128, 1 layer, mid attention": {"block_out_channels": (64, 128, 128)},
    "32-64-128, 2 layers, mid attention": {"block_out_channels": (32, 64, 128), "layers_per_block": 2},
    "32-64-64, 1 layer, attention at 14×14": {
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    },
}


def measure(config: dict, batch: int, steps: int) -> dict:
    unet = UNet2DModel(**config)
    opt = torch.optim.AdamW(unet.parameters(), 1e-4)
    scheduler = ddpm_scheduler()
    x = torch.rand(batch, 1, 28, 28) * 2 - 1

    def step():
        with mixed_precision("cpu"):
            loss = epsilon_loss(lambda a, t: unet(a, t).sample, x, scheduler)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step()
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return {
        "params_M": sum(p.numel() for p in unet.parameters()) / 1e6,
        "gflop_per_image": counter.get_total_flops() / batch / 1e9,
        "images_per_s": batch / seconds,
        "gflops": counter.get_total_flops() / seconds / 1e9,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="runs/unet_presets.json")
    args = p.parse_args()
    result = {"precision": PRECISION, "gemm_gflops": gemm_gflops(COMPUTE_DTYPE), "candidates": {}}
    for name, change in CANDIDATES.items():
        r = measure({**BASE, **change}, args.batch_size, args.steps)
        r["ratio_to_gemm"] = r["gflops"] / result["gemm_gflops"]
        result["candidates"][name] = r
        print(
            f"{name:45s} {r['params_M']:.2f}M  {r['gflop_per_image']:.2f} GFLOP/img  "
            f"{r['images_per_s']:.0f} img/s  {r['gflops']:.0f} GFLOP/s ({r['ratio_to_gemm']:.2f} of GEMM)"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
