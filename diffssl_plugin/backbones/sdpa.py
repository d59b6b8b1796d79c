"""Which scaled-dot-product-attention kernel runs on the CPU.

For the short token sequences of this package's models (49 tokens in the 7×7 middle block of the Fashion-MNIST
U-Net, 13–65 in the MAE ViT and the heads), PyTorch's fused CPU attention kernel is slow **in bf16**, its
backward above all: in a bf16-autocast DDAE training step it took 8% of the time for a negligible share of the
FLOPs, and the step ran 13% faster with plain matrix products (interleaved A/B: 181 → 204 images/s); a bf16
MAE step ran ~30% faster (session 2's measurement), and two timm blocks of the attention head (50 tokens,
width 64, batch 256) 3× faster (forward + backward: 508 → 1,471 images/s). In fp32 the fused kernel is the
faster one (1,210 vs 1,127 images/s for the same blocks), so :func:`cpu_math_attention` switches to the math
backend only on the CPU under a low-precision autocast. Training steps, heads' training and prediction,
fine-tuning and feature extraction all enter it; on other devices PyTorch's choice is left alone.
"""

from __future__ import annotations

import contextlib

import torch


def cpu_math_attention(device: torch.device | str, *, always: bool = False):
    """A context in which ``F.scaled_dot_product_attention`` uses the math backend when ``device`` is the CPU
    and bf16/fp16 autocast is on there (``always=True``: on the CPU whatever the precision)."""
    if torch.device(device).type != "cpu":
        return contextlib.nullcontext()
    low_precision = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in (
        torch.bfloat16,
        torch.float16,
    )
    if not (always or low_precision):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)
