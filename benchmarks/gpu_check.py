"""GPU readiness check: one script a user with a GPU runs, printing numbers and writing JSON.

    python benchmarks/gpu_check.py --out runs/gpu_check.json [--data-root DIR] [--skip-bench]

1. **bf16 GEMM** TFLOP/s of this GPU (8192³ matmuls): the ceiling the other figures are read against.
2. **DDAE training step** (the learner's own ``training_loss`` + AdamW + clipping + EMA, bf16 autocast, a bare
   loop so only the step is timed) for the CPU preset's U-Net (``fmnist_small``, 28×28) and for the DDPM
   paper's 35.7M CIFAR-10 U-Net (``cifar10_ddpm``, 32×32): images/s, achieved TFLOP/s (FLOPs counted once with
   ``torch.utils.flop_counter``) and the ratio to the same run's GEMM rate.
3. **Feature extraction** images/s through the harness (``extract_features``: uint8 to the device, normalised
   there, bf16 autocast; 3 timesteps × 3 blocks of ``fmnist_small``), on the GPU and on this machine's CPU.
4. **CPU and GPU readouts of one checkpoint agree**: the same DDAE weights read on the CPU (fp32) and on the GPU
   (fp32 and bf16): relative feature error, and the linear-probe accuracy from each.
5. **Smoke bench on CUDA**: ``diffssl bench --preset smoke --accelerator gpu`` end to end (skip with
   ``--skip-bench``), its wall time and records count.

Nothing here is a unit test: a GPU is not part of CI. The README quotes what this printed on the GPUs we had.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import diffssl_plugin  # noqa: F401  (timm registration)
from diffssl_plugin.backbones.ddae import DDAEBackbone
from diffssl_plugin.data import load_split
from diffssl_plugin.eval.features import Readout, extract_features
from diffssl_plugin.eval.probes import linear_probe
from diffssl_plugin.methods.ddae import DDAE
from diffssl_plugin.runtime import Runtime


def cuda_seconds(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, timed with CUDA events after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def gemm_tflops(n: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / cuda_seconds(lambda: a @ b, repeats) / 1e12


def training_step(preset: str, image_size: int, channels: int, batch: int, steps: int, gemm: float) -> dict:
    """images/s and TFLOP/s of DDAE's training step on the GPU (bare loop, bf16 autocast)."""
    torch.manual_seed(0)
    model = DDAE(batch_size_per_device=batch, unet_config=preset).cuda()
    optim = model.configure_optimizers()
    opt, sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    images = torch.rand(batch, channels, image_size, image_size, device="cuda")
    flops = model.flops_per_image(images[:8])
    gen = torch.Generator().manual_seed(0)  # the learners draw noise on the CPU (device-independent streams)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.training_loss(images, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        model.ema.update(model.unet)

    seconds = cuda_seconds(step, steps)
    tflops = flops * batch / seconds / 1e12
    return {
        "preset": preset,
        "batch": batch,
        "images_per_s": round(batch / seconds, 1),
        "gflop_per_image": round(flops / 1e9, 4),
        "tflops": round(tflops, 2),
        "ratio_to_bf16_gemm": round(tflops / gemm, 4),
    }


def extraction(model: DDAEBackbone, data, device: str, readouts: list[Readout], batch: int) -> dict:
    rt = Runtime(accelerator="gpu" if device == "cuda" else "cpu")
    extract_features(
        model,
        data.take(torch.arange(min(len(data), batch))),
        readouts,
        batch_size=batch,
        device=device,
        progress=False,
        runtime=rt,
    )  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    extract_features(model, data, readouts, batch_size=batch, device=device, progress=False, runtime=rt)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"device": device, "images": len(data), "batch": batch, "images_per_s": round(len(data) / seconds, 1)}


def readouts_agree(data_root: str | None, gpu: str = "cuda") -> dict:
    """One checkpoint's features on CPU (fp32) vs GPU (fp32, bf16), and the linear probe from each."""
    torch.manual_seed(0)
    model = DDAEBackbone("fmnist_small")
    train = load_split("fashion_mnist", "train", root=data_root).balanced_subset(total=2000)
    test = load_split("fashion_mnist", "test", root=data_root).balanced_subset(total=1000)
    readout = [Readout(10, "up1.0", "avg2x2")]
    feats = {}
    for name, device, amp in (("cpu_fp32", "cpu", False), ("cuda_fp32", gpu, False), ("cuda_bf16", gpu, True)):
        rt = Runtime(accelerator="gpu" if device == "cuda" else "cpu")
        feats[name] = [
            extract_features(model, d, readout, device=device, amp=amp, progress=False, runtime=rt)[readout[0]]
            for d in (train, test)
        ]
    ref = feats["cpu_fp32"]
    out = {}
    for name, (f_train, f_test) in feats.items():
        err = ((f_test - ref[1]).norm() / ref[1].norm()).item()
        probe = linear_probe(
            f_train[:1500], train.labels[:1500], f_train[1500:], train.labels[1500:], f_test, test.labels, cs=(0.1, 1.0)
        )
        out[name] = {"relative_feature_error_vs_cpu_fp32": err, "linear_test_acc": probe.test_acc}
    return out


def smoke_bench(data_root: str | None, timeout: float = 600) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "diffssl_plugin.cli",
            "bench",
            "--preset",
            "smoke",
            "--accelerator",
            "gpu",
            "--out",
            tmp,
            "--no-progress",
        ] + (["--data-root", data_root] if data_root else [])
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            return {"returncode": None, "wall_seconds": timeout, "stderr_tail": str(e.stderr or "")[-1500:]}
        wall = time.perf_counter() - start
        records = Path(tmp, "records.jsonl")
        lines = records.read_text().splitlines() if records.is_file() else []
        devices = sorted({json.loads(line).get("runtime", {}).get("device") for line in lines})
        return {
            "returncode": proc.returncode,
            "wall_seconds": round(wall, 1),
            "records": len(lines),
            "record_devices": devices,
            "stderr_tail": proc.stderr[-1500:] if proc.returncode else "",
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check.json")
    parser.add_argument("--data-root", default=None, help="folder with Fashion-MNIST's IDX files")
    parser.add_argument("--skip-bench", action="store_true", help="skip the smoke bench (a few minutes)")
    parser.add_argument("--bench-timeout", type=float, default=600, help="seconds the smoke bench may take")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device here; nothing to check", file=sys.stderr)
        return 1
    result: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }
    result["bf16_gemm_tflops"] = gemm = round(gemm_tflops(), 1)
    print(json.dumps(result), flush=True)
    result["training_step"] = [
        training_step("fmnist_small", 28, 1, 512, 20, gemm),
        training_step("cifar10_ddpm", 32, 3, 128, 20, gemm),
    ]
    print(json.dumps(result["training_step"]), flush=True)
    data = load_split("fashion_mnist", "test", root=args.data_root)
    model = DDAEBackbone("fmnist_small")
    readouts = [Readout(t, b, "avg2x2") for t in (0, 10, 50) for b in ("mid", "up0", "up1.0")]
    result["extraction"] = [
        extraction(model, data, "cuda", readouts, 1024),
        extraction(model, data.take(torch.arange(2000)), "cpu", readouts, 256),
    ]
    print(json.dumps(result["extraction"]), flush=True)
    result["cpu_vs_gpu_readout"] = readouts_agree(args.data_root)
    print(json.dumps(result["cpu_vs_gpu_readout"]), flush=True)
    if not args.skip_bench:
        result["smoke_bench"] = smoke_bench(args.data_root, args.bench_timeout)
        print(json.dumps(result["smoke_bench"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
