"""DDAE: Denoising Diffusion Autoencoders are unified self-supervised learners (Xiang et al., ICCV 2023).

Pretraining is plain unconditional DDPM (Ho et al. 2020, Algorithm 1):

    repeat
        x0 ~ data, randomly flipped;  x0 ∈ [-1, 1]
        t ~ Uniform{0, …, T-1};  ε ~ N(0, I)
        take a gradient step on ‖ε − ε_θ(√ᾱ_t x0 + √(1-ᾱ_t) ε, t)‖²
        update the EMA of θ
    until the budget is spent

Representation: the EMA network read as an autoencoder (:class:`~diffssl_plugin.backbones.DDAEBackbone`):
noise to a small timestep, one forward, an intermediate decoder block, pooled.

Choices the paper leaves to us (CPU scale): AdamW with lr 5e-4 and 100 warm-up steps (DDAE: Adam 1e-4 per
128 images per GPU, 13 warm-up epochs: too slow for minutes of CPU); gradient-norm clip 1.0 as in DDAE.
EMA: DDAE's own, ``ema_pytorch.EMA`` with its default warm-up, decay ``min(0.9999, 1 − (1 + s)^(−2/3))``
(``ema_warmup="ema_pytorch"``, :mod:`diffssl_plugin.diffusion.ema`), for the paper configs and the CPU preset
alike: over a few hundred CPU steps it averages about as far back as diffusers' ``(1+s)/(10+s)`` did (a
horizon of 63 vs 57 steps at s = 500), so there was nothing to measure a faster warm-up against.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from ..backbones.ddae import UNET_PRESETS, DDAEBackbone
from ..diffusion import EMA, ddpm_scheduler, epsilon_loss
from ..errors import check_name
from .base import SSLMethod, flip_to_unit_range, to_unit_range


class DDAE(SSLMethod):
    """Unconditional DDPM pretraining whose EMA U-Net is read as a DDAE feature backbone."""

    transform = staticmethod(flip_to_unit_range)  # DDPM's: random flip (not for digits), [-1, 1]
    eval_transform = staticmethod(to_unit_range)
    gradient_clip_val = 1.0
    cosine_decay = False  # DDPM: constant rate after the warm-up
    timm_architecture = "ddae_unet_fmnist"  # its model_args carry the full U-Net config

    def __init__(
        self,
        batch_size_per_device: int = 128,
        num_classes: int = 10,
        knn_k: int | None = None,
        knn_t: float | None = None,
        unet_config: dict | str = "fmnist_small",
        lr: float = 5e-4,
        warmup_steps: int = 100,
        ema_decay: float = 0.9999,
        ema_warmup: str = "ema_pytorch",
        readout: dict | None = None,
        seed: int = 0,
        in_chans: int | None = None,
        online_classifier: bool = True,
        hflip: bool | None = None,
    ):
        super().__init__(
            batch_size_per_device,
            num_classes,
            knn_k,
            knn_t,
            lr=lr,
            warmup_steps=warmup_steps,
            seed=seed,
            online_classifier=online_classifier,
        )
        self.save_hyperparameters()
        self.set_hflip(hflip)
        if isinstance(unet_config, str):
            unet_config = UNET_PRESETS[check_name("U-Net preset", unet_config, UNET_PRESETS)]
        config = dict(unet_config)
        if in_chans is not None:
            config["in_channels"] = config["out_channels"] = in_chans
        self.unet = UNet2DModel(**config)
        self.scheduler = ddpm_scheduler()
        self.ema = EMA(self.unet, decay=ema_decay, warmup=ema_warmup)
        self.readout = {**{"timestep": 10, "block": "mid", "pool": "avg2x2"}, **(readout or {})}
        self._backbone_cache: dict[str, DDAEBackbone] = {}  # a dict, so Lightning does not save it twice
        self.init_online_classifier()

    def view_loss(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """DDPM's ε-prediction loss on flipped images ``x0`` in [-1, 1]."""
        return epsilon_loss(lambda x_t, t: self.unet(x_t, t).sample, x0, self.scheduler, generator)

    def after_optimizer_step(self) -> None:
        self.ema.update(self.unet)

    def _wrap(self, key: str, unet: UNet2DModel) -> DDAEBackbone:
        cached = self._backbone_cache.get(key)
        if cached is None or cached.unet is not unet:
            cached = self._backbone_cache[key] = DDAEBackbone(unet=unet, **self.readout)
        return cached

    @property
    def backbone(self) -> DDAEBackbone:
        """The trainable U-Net as a DDAE backbone, for fine-tuning (shares the U-Net's weights; not a
        registered sub-module)."""
        return self._wrap("backbone", self.unet)

    @property
    def feature_backbone(self) -> DDAEBackbone:
        """The EMA U-Net as a DDAE backbone: the representation (export, frozen probes, ``forward``)."""
        return self._wrap("ema", self.ema.module)

    @property
    def generative_unet(self) -> UNet2DModel:
        return self.ema.module
