"""The noise a DDAE-style backbone adds before its one forward: a fixed seeded ε shared by every image (DDPM-seg's
"shared noise", so features do not depend on batch composition and evaluations repeat exactly), or fresh noise
at each call (``noise_seed=None``, as DDAE's code does)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _seeded_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The shared ε of ``seed``: one (1, C, H, W) draw of a CPU generator (the same on every device)."""
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))


class SharedNoiseMixin:
    """``draw_noise(x)``: the ε for a batch like ``x``. Call :meth:`_init_noise` in ``__init__`` (after
    ``nn.Module.__init__``); ``noise_seed`` may be changed afterwards."""

    noise_seed: int | None

    def _init_noise(self, noise_seed: int | None, size: Sequence[int], device: torch.device) -> None:
        """The shared noise at the network's own ``size``, on ``device``: a buffer follows .to() (not saved),
        and torch.compile reads it; other sizes, devices and seeds are drawn once into ``_noise_cache``."""
        self.noise_seed = noise_seed
        shared = None if noise_seed is None else _seeded_noise(noise_seed, size).to(device)
        self.register_buffer("_shared_noise", shared, persistent=False)
        self._shared_noise_seed = noise_seed
        self._noise_cache: dict[tuple, torch.Tensor] = {}

    def draw_noise(self, x: torch.Tensor) -> torch.Tensor:
        """The ε ``extract`` would use for ``x`` (shared seeded noise, or fresh if ``noise_seed`` is None)."""
        return self._noise(x)

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        """Fresh noise, or the shared seeded ε, drawn once per (seed, shape, device, dtype) and kept, so a
        forward neither seeds a generator nor copies noise to the device."""
        if self.noise_seed is None:
            return torch.randn_like(x)
        noise = self._shared_noise
        if (
            noise is None
            or self._shared_noise_seed != self.noise_seed
            or noise.shape[1:] != x.shape[1:]
            or noise.device != x.device
            or noise.dtype != x.dtype
        ):
            key = (self.noise_seed, tuple(x.shape[1:]), x.device, x.dtype)
            noise = self._noise_cache.get(key)
            if noise is None:
                noise = self._noise_cache[key] = _seeded_noise(self.noise_seed, x.shape[1:]).to(x.device, x.dtype)
        return noise.expand_as(x)
