"""Inference images/s of registered backbones in NCHW and in channels-last, in the package's precision for this
CPU (bf16 autocast with bf16 hardware, else fp32): the measurement behind each backbone's
``prefers_channels_last`` (``diffssl_plugin/backbones/memory_format.py``). Diffusion backbones are read at
t = 0 at the default sweep's blocks (2×2-pooled), the others at their pooled output; fastest of ``--repeats``.

    python benchmarks/memory_format.py                       # the four backbones, batch 256
    python benchmarks/memory_format.py ddae_unet_fmnist --batch-size 64 --out runs/memory_format.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import timm
import torch

import diffssl_plugin  # noqa: F401  (registers the backbones)
from diffssl_plugin.eval.features import pooled_output
from diffssl_plugin.runtime import mixed_precision, precision_name

BACKBONES = ("ddae_unet_fmnist", "drl_time_encoder_fmnist", "mdsm_ebm_fmnist", "simclr_resnet18_cifar")
SWEEP_BLOCKS = ("down2", "mid", "up0.0", "up0", "up1.0", "up1")


def images_per_second(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Fastest of ``repeats`` forward passes over ``x`` (after one untimed pass), as images/s."""
    if hasattr(model, "extract"):
        blocks = [b for b in SWEEP_BLOCKS if b in model.block_names] or [model.block]

        def forward():
            return model.extract(x, [0], blocks, pool="avg2x2")
    else:

        def forward():
            return pooled_output(model, x)

    with torch.inference_mode(), mixed_precision("cpu"):
        forward()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            forward()
            times.append(time.perf_counter() - start)
    return len(x) / min(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backbones", nargs="*", default=list(BACKBONES))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/memory_format.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 1, 28, 28)
    result: dict = {"precision": precision_name("cpu"), "batch_size": args.batch_size, "backbones": {}}
    for name in args.backbones:
        model = timm.create_model(name).eval()
        rates = {}
        for fmt, layout in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            model.to(memory_format=layout)
            rates[fmt] = images_per_second(model, x, args.repeats)
        result["backbones"][name] = rates
        print(f"{name}: NCHW {rates['nchw']:.0f} images/s, channels-last {rates['channels_last']:.0f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
