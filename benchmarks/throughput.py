"""Throughput of the DDAE training step and of feature extraction, against this machine's own GEMM speed.

Prints and writes JSON with:
* fp32 GEMM GFLOP/s and the GEMM GFLOP/s of the dtype the package computes in here (bf16 on CPUs with bf16
  hardware, else fp32; ``precision``), 2048² matmuls measured in the same run: the machine's ceiling (measured
  before every timed turn of training steps too, so the ratio compares the same moments of the machine);
* DDAE training images/s and achieved GFLOP/s (FLOPs counted once with ``torch.utils.flop_counter``), and its
  ratio to that GEMM figure (target ≥ 0.5);
* DDAE feature extraction images/s (one U-Net forward per timestep, early exit);
* the harness's overhead: ``diffssl pretrain`` (Lightning, checkpoints, logging) against a plain PyTorch loop
  training the same model with the same batch, optimiser, clipping, EMA and mixed precision (target ≤ 5%);
* SimCLR and MAE training images/s and achieved GFLOP/s (``benchmarks/baselines_throughput.py``), and their
  ratio to the same run's GEMM GFLOP/s.

    python benchmarks/throughput.py --out runs/throughput.json

Measured in alternating turns (bare loop, then Lightning, ``--rounds`` times; GEMM before each turn),
because this project's shared 2-core host drifts by up to ±20% within minutes. Headline figures are paired:
the ratio is the median over Lightning turns of (that turn's median step GFLOP/s ÷ the GEMM rate measured just
before it), the overhead the median over rounds of (1 − bare-loop turn's median step time ÷ the Lightning
turn's). Beside them: the same from all steps pooled (``*_overall``), from means, and from the fastest step
(``*_best``: the least disturbed step, what the code itself costs on a shared machine).
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
from diffssl_plugin.runtime import auto_autocast_dtype, mixed_precision, precision_name

#: the dtype the package computes in on this CPU (bf16 where the CPU has bf16 hardware, else fp32): the training
#: step runs in it and the GEMM ceiling is measured in it
COMPUTE_DTYPE = auto_autocast_dtype("cpu") or torch.float32
PRECISION = precision_name("cpu")


def gemm_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10, trials: int = 5) -> float:
    """Median over ``trials`` of the GFLOP/s of ``repeats`` n×n matmuls: the machine's dense-math ceiling."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    rates = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        rates.append(2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


class PlainLoop:
    """The same DDAE step as the Lightning run (batch, optimiser and schedule, clipping, EMA, mixed precision,
    CPU attention backend), written as a bare PyTorch loop that can be run a few steps at a time."""

    def __init__(self, images: torch.Tensor, batch: int, method_kwargs: dict | None = None):
        self.images, self.batch, self.step = images, batch, 0
        self.model = DDAE(batch_size_per_device=batch, **(method_kwargs or {}))
        optim = self.model.configure_optimizers()
        self.opt, self.sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
        self.flops_per_image = self.model.flops_per_image(images[:8].float() / 255)

    def run(self, steps: int) -> list[float]:
        """Take ``steps`` steps; returns each one's wall seconds."""
        seconds = []
        for _ in range(steps):
            start = time.perf_counter()
            x = self.images[(self.step * self.batch) % (len(self.images) - self.batch) :][: self.batch]
            gen = torch.Generator().manual_seed(self.step)
            with mixed_precision("cpu"), cpu_math_attention("cpu"):
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


def interleaved_step_seconds(
    images: torch.Tensor,
    batch: int,
    steps: int,
    rounds: int,
    skip: int,
    method_kwargs: dict | None = None,
    gemm_size: int = 2048,
) -> tuple[list[float], list[float], list[float], float]:
    """Per-step seconds of the bare loop and of ``diffssl pretrain``, measured in ``rounds`` alternating
    turns (Lightning resumes its own checkpoint each turn), so a drift of the machine's speed weighs on
    both alike. An untimed turn of ``2·skip`` steps each comes first (the first steps of a process are slow:
    allocations, oneDNN kernel set-up), and the first ``skip`` steps of every turn are not timed.

    The GEMM rate is measured before every timed turn too, so the ratio of the two compares the same
    moments of a machine whose speed drifts (a shared host).

    Returns (plain seconds, Lightning seconds, GEMM GFLOP/s of each timed turn, FLOPs per image)."""
    plain_loop, timer = PlainLoop(images, batch, method_kwargs), StepTimer(skip)
    per_round = max(1, steps // rounds)
    plain: list[float] = []
    gemm: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:

        def lightning_until(step: int) -> None:
            pretrain(
                "ddae",
                budget=Budget(steps=step),
                out_dir=tmp,
                batch_size=batch,
                progress=False,
                logger=False,
                callbacks=[timer],
                resume=True,
                checkpoint_every=10**6,
                max_images=len(images),
                method_kwargs=method_kwargs,
            )

        done = 2 * skip
        plain_loop.run(done)  # the untimed warm-up turns
        lightning_until(done)
        timer.seconds.clear()
        for _ in range(rounds):
            gemm.append(gemm_gflops(COMPUTE_DTYPE, n=gemm_size, trials=1))
            plain += plain_loop.run(skip + per_round)[skip:]
            gemm.append(gemm_gflops(COMPUTE_DTYPE, n=gemm_size, trials=1))
            done += skip + per_round + 1  # one more batch start closes the turn's last timed step
            lightning_until(done)
    return plain, timer.seconds, gemm, plain_loop.flops_per_image


def round_medians(seconds: list[float], per_round: int) -> list[float]:
    """Median step time of each consecutive run of ``per_round`` steps (one turn)."""
    return [statistics.median(seconds[i : i + per_round]) for i in range(0, len(seconds), per_round)]


def extraction_images_per_second(backbone, images: torch.Tensor, timesteps, blocks, batch: int = 256) -> float:
    x = images[:batch].float() / 255 * 2 - 1
    with torch.no_grad(), mixed_precision("cpu"):
        backbone.extract(x, timesteps, blocks, pool="avg")
        start = time.perf_counter()
        for _ in range(3):
            backbone.extract(x, timesteps, blocks, pool="avg")
    return 3 * batch * len(timesteps) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="timed training steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of every turn")
    p.add_argument(
        "--rounds",
        type=int,
        default=10,
        help="alternating turns of the bare loop and of Lightning the timed steps are split into",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--gemm-size", type=int, default=2048, help="n of the n×n matmuls that measure the GEMM ceiling (tests: small)"
    )
    p.add_argument("--out", default="runs/throughput.json")
    p.add_argument("--no-baselines", action="store_true", help="skip the SimCLR and MAE measurements")
    p.add_argument(
        "--method-args", type=json.loads, default={}, help="JSON dict of DDAE arguments (default: the CPU preset)"
    )
    args = p.parse_args(argv)
    torch.manual_seed(0)
    images = load_split("fashion_mnist", "trainval").images[:20000]
    result: dict = {"threads": torch.get_num_threads(), "batch_size": args.batch_size, "precision": PRECISION}
    result["gemm_size"] = args.gemm_size
    result["gemm_fp32_gflops"] = gemm_gflops(torch.float32, n=args.gemm_size)
    result["gemm_gflops_at_start"] = gemm_gflops(COMPUTE_DTYPE, n=args.gemm_size)

    plain, lightning, gemm, flops_per_image = interleaved_step_seconds(
        images, args.batch_size, args.steps, args.rounds, args.warmup, args.method_args, args.gemm_size
    )
    per_round = max(1, args.steps // args.rounds)
    result["gemm_gflops"] = statistics.median(gemm)  # measured between the timed turns
    result["gemm_gflops_per_turn"] = [round(g, 1) for g in gemm]
    plain_ips = args.batch_size / statistics.median(plain)
    lightning_ips = args.batch_size / statistics.median(lightning)
    result["flops_per_image_train"] = flops_per_image
    result["steps_timed"] = {"plain_loop": len(plain), "lightning": len(lightning)}
    plain_rounds, lightning_rounds = round_medians(plain, per_round), round_medians(lightning, per_round)
    result["median_step_seconds_per_round"] = {
        "plain_loop": [round(x, 4) for x in plain_rounds],
        "lightning": [round(x, 4) for x in lightning_rounds],
    }
    result["plain_loop_images_per_s"] = plain_ips
    result["lightning_images_per_s"] = lightning_ips
    result["plain_loop_images_per_s_mean"] = args.batch_size * len(plain) / sum(plain)
    result["lightning_images_per_s_mean"] = args.batch_size * len(lightning) / sum(lightning)
    # the fastest step is the least disturbed by other processes on a shared machine (as ``timeit`` reasons;
    # interference only adds time), so the best-step figures estimate the code's own cost
    result["plain_loop_images_per_s_best"] = args.batch_size / min(plain)
    result["lightning_images_per_s_best"] = args.batch_size / min(lightning)
    result["train_gflops_achieved"] = lightning_ips * flops_per_image / 1e9
    # headline ratio: each Lightning turn's median step against the GEMM rate measured just before that turn
    result["train_to_gemm_ratio_per_turn"] = [
        round(args.batch_size / sec * flops_per_image / 1e9 / g, 3) for sec, g in zip(lightning_rounds, gemm[1::2])
    ]
    result["train_to_gemm_ratio"] = statistics.median(result["train_to_gemm_ratio_per_turn"])
    result["train_to_gemm_ratio_overall"] = result["train_gflops_achieved"] / result["gemm_gflops"]
    # headline overhead: each round's Lightning turn against the bare-loop turn right before it
    result["harness_overhead_per_round"] = [round(1 - p / q, 4) for p, q in zip(plain_rounds, lightning_rounds)]
    result["harness_overhead"] = statistics.median(result["harness_overhead_per_round"])
    result["harness_overhead_overall"] = 1 - lightning_ips / plain_ips
    result["harness_overhead_mean"] = 1 - result["lightning_images_per_s_mean"] / result["plain_loop_images_per_s_mean"]
    result["harness_overhead_best"] = 1 - min(plain) / min(lightning)
    result["train_to_gemm_ratio_best"] = (
        result["lightning_images_per_s_best"] * flops_per_image / 1e9 / result["gemm_gflops"]
    )

    backbone = DDAE(**args.method_args).feature_backbone
    with torch.no_grad():
        fwd = FlopCounterMode(display=False)
        with fwd:
            backbone.extract(images[:8].float() / 255 * 2 - 1, [10], ["up1"], pool="avg")
    result["extract_flops_per_image_to_up1"] = fwd.get_total_flops() / 8
    result["extract_images_per_s_mid"] = extraction_images_per_second(backbone, images, [10], ["mid"])
    result["extract_images_per_s_all_blocks"] = extraction_images_per_second(
        backbone, images, [10], backbone.block_names
    )
    if not args.no_baselines:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from baselines_throughput import baselines_throughput

        baselines = baselines_throughput(args.batch_size, steps=max(3, args.steps // 4), warmup=1)
        for m in ("simclr", "mae"):
            r = baselines[m]
            result[f"{m}_images_per_s"] = r["images_per_s"]
            result[f"{m}_train_flops_per_image"] = r["train_flops_per_image"]
            result[f"{m}_train_to_gemm_ratio"] = r["achieved_gflops_per_s"] / result["gemm_gflops"]
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
