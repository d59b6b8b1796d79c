"""Shared fixtures: a tiny DDAE backbone (8×8 grey U-Net) and small batches of real Fashion-MNIST images."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import diffssl_plugin  # noqa: F401  (registers the timm models)
from diffssl_plugin.backbones import DDAEBackbone

# The models here are tiny: one thread is as fast as two, and it does not collapse when another process
# keeps the (two) cores busy (OpenMP threads spin-waiting on each other made 8×8 convs take ~30 ms each).
torch.set_num_threads(1)

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, so a failure repeats."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_unet_config() -> dict:
    return dict(TINY_UNET)


@pytest.fixture
def tiny_backbone() -> DDAEBackbone:
    """A randomly initialised 8×8 grey DDAE backbone (fresh per test: tests may change its settings)."""
    torch.manual_seed(0)
    return DDAEBackbone(unet_config=dict(TINY_UNET), timestep=10, block="mid", pool="avg").eval()


@pytest.fixture(scope="session")
def fmnist_uint8() -> torch.Tensor:
    """The first 64 Fashion-MNIST test images, uint8 (64, 1, 28, 28)."""
    from diffssl_plugin.data import load_split

    return load_split("fashion_mnist", "test", download=False).images[:64].clone()


@pytest.fixture(scope="session")
def real_batch28(fmnist_uint8) -> torch.Tensor:
    """64 real 28×28 images normalised to [-1, 1] (mean = std = 0.5)."""
    return fmnist_uint8.float().div(255.0).sub(0.5).div(0.5)


@pytest.fixture(scope="session")
def real_batch(real_batch28) -> torch.Tensor:
    """64 real images resized to 8×8 for the tiny U-Net, in [-1, 1]."""
    x = F.interpolate(real_batch28, size=(8, 8), mode="area")
    assert x.min() >= -1 and x.max() <= 1
    return x.contiguous()


def write_idx(path: Path, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write an unsigned-byte IDX file: magic (0x00, 0x00, type 0x08 = uint8, ndim), big-endian int32 dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    compress = path.suffix == ".gz" if compress is None else compress
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.fixture
def idx_writer():
    return write_idx


@pytest.fixture
def sdpa_flash_allowed(monkeypatch) -> list[bool]:
    """Records, for every ``F.scaled_dot_product_attention`` call, whether the fused kernels were allowed."""
    calls: list[bool] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append(torch.backends.cuda.flash_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls
