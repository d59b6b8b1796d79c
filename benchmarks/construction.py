"""What building a DDAE backbone costs, and whether extraction kept its speed.

Prints and writes JSON with medians over ``--repeats``:

* ``adm256_unet_s``: ``UNet2DModel(**adm_unet_config(adm256_uncond))`` with random weights (the 554M-parameter
  256×256 ADM of :mod:`diffssl_plugin.checkpoints.adm`; no checkpoint file), the part no backbone can avoid;
* ``adm256_backbone_s``: ``DDAEBackbone(unet=...)`` around that U-Net (block ``up1.1``, t = 150, as
  ``load_adm``), i.e. what wrapping costs on top of the U-Net;
* ``adm256_with_settings_s``: ``backbone.with_settings(block="up2.0", timestep=50)``;
* ``extract_images_per_s``: ``eval.features.extract_features`` with the default ``fmnist_small`` DDAE backbone
  (``ddae_unet_fmnist``, random weights) on ``--images`` Fashion-MNIST test images, batch 256, bf16 autocast,
  readouts at t ∈ (0, 10, 50) × blocks (mid, up0, up1), no cache.

    python benchmarks/construction.py --out runs/construction.json

``--threads`` (default 1) fixes torch's CPU threads, so runs on a shared host compare.

Measured on this project's shared 2-core host, one thread, before (527240b: a real forward probed the block
shapes) and after (meta-device shapes), medians of 3: ADM-256 backbone 31.8 s → 0.54 s on top of the 3.3 s
U-Net, ``with_settings`` 29.2 s → 0.004 s; extraction, 5 interleaved rounds of 2: 191 → 190 images/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import timm
import torch
from diffusers import UNet2DModel

import diffssl_plugin  # noqa: F401  (registers the timm models)
from diffssl_plugin.backbones import DDAEBackbone
from diffssl_plugin.checkpoints.adm import adm_config, adm_unet_config
from diffssl_plugin.data import load_split
from diffssl_plugin.eval.features import Readout, extract_features


def adm_construction(repeats: int) -> dict:
    unet_s, backbone_s, settings_s = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        unet = UNet2DModel(**adm_unet_config(adm_config("adm256_uncond"))).eval()
        built = time.perf_counter()
        backbone = DDAEBackbone(unet=unet, block="up1.1", timestep=150, pool="avg2x2").eval()
        wrapped = time.perf_counter()
        backbone.with_settings(block="up2.0", timestep=50)
        unet_s.append(built - start), backbone_s.append(wrapped - built)
        settings_s.append(time.perf_counter() - wrapped)
        print(
            f"ADM-256: U-Net {unet_s[-1]:.2f} s, backbone {backbone_s[-1]:.3f} s, with_settings {settings_s[-1]:.3f} s",
            flush=True,
        )
    return {
        "adm256_unet_s": statistics.median(unet_s),
        "adm256_backbone_s": statistics.median(backbone_s),
        "adm256_with_settings_s": statistics.median(settings_s),
        "adm256_runs": {"unet_s": unet_s, "backbone_s": backbone_s, "with_settings_s": settings_s},
    }


def extraction(repeats: int, images: int) -> dict:
    data = load_split("fashion_mnist", "test", download=False)
    data = data.take(torch.arange(min(images, len(data))))
    torch.manual_seed(0)
    model = timm.create_model("ddae_unet_fmnist").eval()
    readouts = [Readout(t, b, "avg") for t in (0, 10, 50) for b in ("mid", "up0", "up1")]
    extract_features(model, data.take(torch.arange(min(64, len(data)))), readouts, progress=False)  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        extract_features(model, data, readouts, batch_size=256, amp=True, progress=False)
        rates.append(len(data) / (time.perf_counter() - start))
        print(f"extraction: {rates[-1]:.0f} images/s", flush=True)
    return {
        "extract_images_per_s": statistics.median(rates),
        "extract_runs_images_per_s": rates,
        "extract_images": len(data),
        "extract_readouts": [r.label() for r in readouts],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adm-repeats", type=int, default=None, help="default: --repeats")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-adm", action="store_true", help="skip the ADM-256 construction")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "torch": torch.__version__}
    result.update(extraction(args.repeats, args.images))
    if not args.no_adm:
        result.update(adm_construction(args.adm_repeats or args.repeats))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
