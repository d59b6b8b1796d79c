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

    python benchmarks/throughput.py --out runs/throughput.json

Per-step wall times are summarised by their median (means are reported too): on a shared or busy machine
the median is what the code itself achieves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.flop_counter import FlopCounterMode

import diffssl_plugin  # noqa: F401
from diffssl_plugin.backbones.sdpa import cpu_math_attention
from diffssl_plugin.data import load_split
from diffssl_plugin.methods.ddae import DDAE
from diffssl_plugin.methods.training import Budget, pretrain


def gemm_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10, trials: int = 5) -> float:
    """Median over ``trials`` of the GFLOP/s of ``repeats`` n×n matmuls: the machine's dense-math ceiling."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    rates = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        rates.append(2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


class PlainLoop:
    """The same DDAE step as the Lightning run (batch, optimiser and schedule, clipping, EMA, bf16 autocast,
    CPU attention backend), written as a bare PyTorch loop that can be run a few steps at a time."""

    def __init__(self, images: torch.Tensor, batch: int):
        self.images, self.batch, self.step = images, batch, 0
        self.model = DDAE(batch_size_per_device=batch)
        optim = self.model.configure_optimizers()
        self.opt, self.sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
        self.flops_per_image = self.model.flops_per_image(images[:8].float() / 255)

    def run(self, steps: int) -> list[float]:
        """Take ``steps`` steps; returns each one's wall seconds."""
        seconds = []
        for _ in range(steps):
            start = time.perf_counter()
            x = self.images[(self.step * self.batch) % (len(self.images) - self.batch):][:self.batch]
            gen = torch.Generator().manual_seed(self.step)
            with torch.autocast("cpu", dtype=torch.bfloat16), cpu_math_attention("cpu"):
                loss = self.model.training_loss(x.float() / 255, gen)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.sched.step()
            self.model.ema.update(self.model.unet)
            self.step += 1
            seconds.append(time.perf_counter() - start)
        return seconds


class StepTimer(pl.Callback):
    """Wall seconds of each training step inside the Lightning loop, skipping the first ``skip`` steps of
    every ``fit``: the time between consecutive batch starts, so everything Lightning does between two steps
    (data, hooks, logging, checkpoint checks, the progress bar) is counted."""

    def __init__(self, skip: int):
        self.skip, self.seconds = skip, []
        self._last, self._seen = None, 0

    def on_train_start(self, trainer, pl_module):
        self._last, self._seen = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        self._seen += 1
        if self._seen > self.skip + 1:
            self.seconds.append(now - self._last)
        self._last = now


def interleaved_step_seconds(images: torch.Tensor, batch: int, steps: int, rounds: int, skip: int
                             ) -> tuple[list[float], list[float], float]:
    """Per-step seconds of the bare loop and of ``diffssl pretrain``, measured in ``rounds`` alternating
    turns (Lightning resumes its own checkpoint each turn), so a drift of the machine's speed weighs on
    both alike. The first ``skip`` steps of every turn are not timed.

    Returns (plain seconds, Lightning seconds, FLOPs per image)."""
    plain_loop, timer = PlainLoop(images, batch), StepTimer(skip)
    per_round = max(1, steps // rounds)
    plain: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            plain += plain_loop.run(skip + per_round)[skip:]
            pretrain("ddae", budget=Budget(steps=(r + 1) * (skip + per_round + 1)), out_dir=tmp,
                     batch_size=batch, progress=False, logger=False, callbacks=[timer], resume=True,
                     checkpoint_every=10 ** 6, max_images=len(images))
    return plain, timer.seconds, plain_loop.flops_per_image


def extraction_images_per_second(backbone, images: torch.Tensor, timesteps, blocks,
                                 batch: int = 256) -> float:
    x = images[:batch].float() / 255 * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        backbone.extract(x, timesteps, blocks, pool="avg")
        start = time.perf_counter()
        for _ in range(3):
            backbone.extract(x, timesteps, blocks, pool="avg")
    return 3 * batch * len(timesteps) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="timed training steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of every turn")
    p.add_argument("--rounds", type=int, default=4,
                   help="alternating turns of the bare loop and of Lightning the timed steps are split into")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default="runs/throughput.json")
    p.add_argument("--no-baselines", action="store_true", help="skip the SimCLR and MAE measurements")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    images = load_split("fashion_mnist", "trainval").images[:20000]
    result: dict = {"threads": torch.get_num_threads(), "batch_size": args.batch_size}
    result["gemm_fp32_gflops"] = gemm_gflops(torch.float32)
    result["gemm_bf16_gflops"] = gemm_gflops(torch.bfloat16)

    plain, lightning, flops_per_image = interleaved_step_seconds(
        images, args.batch_size, args.steps, args.rounds, args.warmup)
    plain_ips = args.batch_size / statistics.median(plain)
    lightning_ips = args.batch_size / statistics.median(lightning)
    result["flops_per_image_train"] = flops_per_image
    result["steps_timed"] = {"plain_loop": len(plain), "lightning": len(lightning)}
    result["plain_loop_images_per_s"] = plain_ips
    result["lightning_images_per_s"] = lightning_ips
    result["plain_loop_images_per_s_mean"] = args.batch_size * len(plain) / sum(plain)
    result["lightning_images_per_s_mean"] = args.batch_size * len(lightning) / sum(lightning)
    result["train_gflops_achieved"] = lightning_ips * flops_per_image / 1e9
    result["train_to_bf16_gemm_ratio"] = result["train_gflops_achieved"] / result["gemm_bf16_gflops"]
    result["harness_overhead"] = 1 - lightning_ips / plain_ips
    result["harness_overhead_mean"] = (1 - result["lightning_images_per_s_mean"]
                                       / result["plain_loop_images_per_s_mean"])

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
