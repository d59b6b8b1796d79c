"""Memory format: channels-last where a backbone runs faster in it.

A backbone class says so with ``prefers_channels_last = True``; the places that run it in bulk (feature
extraction, pretraining, fine-tuning, energy scoring) call :func:`use_preferred_memory_format` once. Only the
module's 4-D weights change layout: a convolution with channels-last weights returns a channels-last map
whatever its input's layout, so the inputs need no change; weights are written and hashed in NCHW
(``io.py``, :func:`contiguous_weights` around the export), so exports and model hashes do not depend on it.

Measured on a 2-core Xeon (AMX-bf16) under bf16 autocast, batch 256 of 28×28 images (`benchmarks/throughput.py`
has the training step): CIFAR ResNet-18 inference 480 → 722 images/s, training 141 → 159; MDSM's energy
ResNet inference 303 → 593. The GroupNorm U-Nets went the other way (DDAE 1,505 → 641, the DRL encoder
1,155 → 670: oneDNN's channels-last GroupNorm is slow on CPUs), so they keep NCHW. On a 2-core AVX2 AMD EPYC in
fp32 (no bf16 hardware; ``benchmarks/memory_format.py``, two runs) the U-Nets showed no consistent gain (DDAE
295 → 304 and 289 → 361 images/s, the DRL encoder 735 → 819 and 820 → 649) and the ResNets gained as on the Xeon
(121 → 177 and 119 → 196; 105 → 135 and 102 → 137), so the choice holds on both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def prefers_channels_last(model: nn.Module) -> bool:
    """Whether ``model`` or any module inside it (a wrapped backbone) declares channels-last faster."""
    return any(getattr(m, "prefers_channels_last", False) for m in model.modules())


def use_preferred_memory_format(model: nn.Module) -> nn.Module:
    """``model`` with its 4-D weights in channels-last when it or a module inside it prefers that, else
    unchanged. In place, like ``nn.Module.to`` (parameters stay the same objects, so an optimiser built
    before keeps them); returns ``model``."""
    if prefers_channels_last(model):
        model.to(memory_format=torch.channels_last)
    return model


@contextlib.contextmanager
def contiguous_weights(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with NCHW-contiguous weights inside the block (writers that need contiguous tensors, such as
    safetensors), back in channels-last after it if it was so before."""
    was_channels_last = any(
        p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
        for p in model.parameters()
    )
    model.to(memory_format=torch.contiguous_format)
    try:
        yield model
    finally:
        if was_channels_last:
            model.to(memory_format=torch.channels_last)
