"""Throughput of the DDAE training step and of feature extraction, against this machine's own GEMM speed.

Prints and writes JSON with:
* fp32 and bf16 GEMM GFLOP/s (2048² matmuls) measured in the same run: the machine's ceiling;
* DDAE training images/s and achieved GFLOP/s (FLOPs counted once with ``torch.utils.flop_counter``), and its
  ratio to the bf16 GEMM figure (target ≥ 0.5);
* DDAE feature extraction images/s (one U-Net forward per timestep, early exit);
* the harness's overhead: ``diffssl pretrain`` (Lightning, checkpoints, logging) against a plain PyTorch loop
  training the same model with the same batch, optimiser, clipping, EMA and bf16 autocast (target ≤ 5%);
* SimCLR and MAE training images/s and achieved GFLOP/s (``benchmarks/baselines_throughput.py``), and their
  ratio to the same run's bf16 GEMM GFLOP/s.

    python benchmarks/throughput.py --steps 40 --out runs/throughput.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.flop_counter import FlopCounterMode

import diffssl_plugin  # noqa: F401
from diffssl_plugin.data import load_split
from diffssl_plugin.methods.ddae import DDAE
from diffssl_plugin.methods.training import Budget, pretrain


def gemm_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9


def plain_loop_images_per_second(images: torch.Tensor, batch: int, steps: int, warmup: int) -> tuple[float, float]:
    """The same DDAE step as the Lightning run, written as a bare loop. Returns (images/s, FLOPs per image)."""
    model = DDAE(batch_size_per_device=batch)
    opt = model.configure_optimizers()["optimizer"]
    flops_per_image = model.flops_per_image(images[:8].float() / 255)
    elapsed = 0.0
    for step in range(warmup + steps):
        x = images[(step * batch) % (len(images) - batch):][:batch].float() / 255
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.training_loss(x, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.ema.update(model.unet)
        if step >= warmup:
            elapsed += time.perf_counter() - start
    return batch * steps / elapsed, flops_per_image


class StepTimer(pl.Callback):
    """Wall time of training steps after ``warmup`` steps, measured inside the Lightning loop."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.end, self.steps = time.perf_counter(), trainer.global_step - self.warmup


def extraction_images_per_second(backbone, images: torch.Tensor, timesteps, blocks, batch: int = 256) -> float:
    x = images[:batch].float() / 255 * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        backbone.extract(x, timesteps, blocks, pool="avg")
        start = time.perf_counter()
        for _ in range(3):
            backbone.extract(x, timesteps, blocks, pool="avg")
    return 3 * batch * len(timesteps) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="timed training steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default="runs/throughput.json")
    p.add_argument("--no-baselines", action="store_true", help="skip the SimCLR and MAE measurements")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    images = load_split("fashion_mnist", "trainval").images[:20000]
    result: dict = {"threads": torch.get_num_threads(), "batch_size": args.batch_size}
    result["gemm_fp32_gflops"] = gemm_gflops(torch.float32)
    result["gemm_bf16_gflops"] = gemm_gflops(torch.bfloat16)

    plain_ips, flops_per_image = plain_loop_images_per_second(images, args.batch_size, args.steps, args.warmup)
    result["flops_per_image_train"] = flops_per_image
    result["plain_loop_images_per_s"] = plain_ips

    timer = StepTimer(args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        run = pretrain("ddae", budget=Budget(steps=args.warmup + args.steps), out_dir=tmp,
                       batch_size=args.batch_size, progress=False, logger=False, callbacks=[timer],
                       checkpoint_every=10 ** 6, max_images=20000)
    lightning_ips = args.batch_size * timer.steps / (timer.end - timer.start)
    result["lightning_images_per_s"] = lightning_ips
    result["train_gflops_achieved"] = lightning_ips * flops_per_image / 1e9
    result["train_to_bf16_gemm_ratio"] = result["train_gflops_achieved"] / result["gemm_bf16_gflops"]
    result["harness_overhead"] = 1 - lightning_ips / plain_ips
    result["pretrain_steps"] = run.steps

    backbone = DDAE().backbone
    with torch.no_grad():
        fwd = FlopCounterMode(display=False)
        with fwd:
            backbone.extract(images[:8].float() / 255 * 2 - 1, [10], ["up1"], pool="avg")
    result["extract_flops_per_image_to_up1"] = fwd.get_total_flops() / 8
    result["extract_images_per_s_mid"] = extraction_images_per_second(backbone, images, [10], ["mid"])
    result["extract_images_per_s_all_blocks"] = extraction_images_per_second(
        backbone, images, [10], ["down2", "mid", "up0", "up1", "up2"])
    if not args.no_baselines:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from baselines_throughput import baselines_throughput

        baselines = baselines_throughput(args.batch_size, steps=max(3, args.steps // 4), warmup=1)
        for m in ("simclr", "mae"):
            r = baselines[m]
            result[f"{m}_images_per_s"] = r["images_per_s"]
            result[f"{m}_train_flops_per_image"] = r["train_flops_per_image"]
            result[f"{m}_train_to_bf16_gemm_ratio"] = r["achieved_gflops_per_s"] / result["gemm_bf16_gflops"]
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
