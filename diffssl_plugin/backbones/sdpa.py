"""Which scaled-dot-product-attention kernel runs on the CPU.

For the short token sequences of this package's models (49 tokens in the 7×7 middle block of the Fashion-MNIST
U-Net, 13–65 in the MAE ViT), PyTorch's fused CPU attention kernel is slow, its backward above all: in a bf16
DDAE training step it took 8% of the time for a negligible share of the FLOPs, and the step ran 13% faster
with plain matrix products (``benchmarks/throughput.py``; 181 → 204 images/s in an interleaved A/B run); a
bf16 MAE step ran ~30% faster. Every attention call made by a training step or a feature extraction goes
through :func:`cpu_math_attention`; on other devices PyTorch's choice is left alone.
"""

from __future__ import annotations

import contextlib

import torch


def cpu_math_attention(device: torch.device | str):
    """A context in which ``F.scaled_dot_product_attention`` uses the math backend, on the CPU only."""
    if torch.device(device).type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)
