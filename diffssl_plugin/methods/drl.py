"""DRL: Diffusion-Based Representation Learning (Mittal*, Abstreiter*, Bauer, Schölkopf, Mehrjou; arXiv
2105.14257, ICML 2023), and its variational form VDRL.

An encoder E_φ sees the clean image; a score network s_θ sees the noisy image, the noise level and the code.
Both are trained jointly, end to end, by denoising score matching on the VE SDE (λ(t) = σ²(t)):

    repeat
        x0 ~ data, randomly flipped (not digits: see ``hflip``);  x0 ∈ [-1, 1]
        t ~ sampler ("uniform_t": σ log-uniform on [0.01, 50]; "uniform_sigma": σ uniform);  σ = σ(t)
        ε ~ N(0, I);  x_t = x0 + σ ε
        z = E_φ(x0)   or   z = E_φ(x0, t)                      (time-dependent code)
            VDRL: (μ, log s²) = E_φ(x0[, t]);  z = μ + s ξ;  KL = KL(N(μ, s²) ‖ N(0, I))
        take a gradient step on ‖σ s_θ(x_t, σ, z) + ε‖²  (+ β KL)  w.r.t. θ and φ
        update the EMA of φ
    until the budget is spent

Representation: the EMA encoder's code (the mean code for VDRL) at a chosen t, or concatenated over several
t (:class:`~diffssl_plugin.backbones.drl.DRLBackbone`).

Choices the paper leaves open (its appendix, with the architecture, was not available):

* **How z enters the score net** (our choice): ``Linear(z)`` is added to the U-Net's time embedding, which
  conditions every residual block, i.e. diffusers ``UNet2DModel(class_embed_type="identity")`` fed the
  projected code as ``class_labels`` (the way NCSN++/ADM add class conditioning).
* **Score-net noise input and output** (NCSN++, score_sde's VE model): the U-Net's "timestep" is σ itself,
  embedded as Gaussian Fourier features of log σ (``time_embedding_type="fourier"``), and its output is divided
  by σ: ``s_θ = unet_out / σ``. So ``σ s_θ = unet_out`` predicts −ε and the loss is well scaled at every σ.
* **Loss units**: the squared norm is averaged over pixels (score_sde ``reduce_mean=True``). VDRL's KL and the
  optional L1 penalty on z (the paper's regulariser for its 2-D pictures) are per-image sums over code
  dimensions divided by the number of pixels, so ``β`` weighs the KL against the pixel-*summed* DSM loss as in
  a β-VAE. β = 1 by default (the paper's value is in the missing appendix).
* CPU-scale optimisation: AdamW lr 5e-4, 100 warm-up steps, gradient-norm clip 1.0 (score_sde clips at 1),
  encoder EMA 0.999 with diffusers' warm-up (score_sde keeps an EMA of its VE models at 0.999).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UNet2DModel
from torch import nn

from ..backbones.drl import (
    SCORE_NET_PRESETS,
    DRLBackbone,
    build_encoder,
    check_readout_t,
    drl_backbone,
    preset_config,
)
from ..diffusion import EMA
from ..diffusion.losses import gaussian_kl, reparameterise
from ..diffusion.ve import noise_sampler, ve_dsm_loss
from ..errors import InputError
from .base import SSLMethod, flip_to_unit_range, to_unit_range

#: score_sde's training augmentation: random horizontal flip (not for digits), then [0, 1] → [-1, 1]
drl_transform = flip_to_unit_range


def build_score_net(unet_config: dict | str, in_chans: int | None = None) -> UNet2DModel:
    """The NCSN++-style conditional VE score U-Net (Fourier σ embedding, output / σ, identity class embedding)."""
    config = preset_config("score-net preset", unet_config, SCORE_NET_PRESETS)
    if in_chans is not None:
        config["in_channels"] = config["out_channels"] = in_chans
    config.update(time_embedding_type="fourier", class_embed_type="identity")
    return UNet2DModel(**config)


class DRL(SSLMethod):
    """DRL learner: encoder and conditional VE score network trained jointly; the encoder is the backbone.

    Args (beyond lightly's):
        code_dim: size of the code z (2 for the paper's pictures).
        time_dependent: use E(x0, t) (the "infinite-dimensional" code) instead of E(x0).
        encoder_config / unet_config: presets (``backbones.drl.ENCODER_PRESETS`` / ``SCORE_NET_PRESETS``) or dicts.
        sampler: ``"uniform_t"`` (log-uniform σ, default) or ``"uniform_sigma"``; ``sigma_range`` restricts σ.
        sigma_min, sigma_max: the VE schedule (paper: 0.01, 50).
        conditional: False zeroes z (same architecture, no information about x0): the unconditional baseline.
        l1_weight: L1 penalty on z; readout_t: times the exported backbone reads a time-dependent code at.
        ema_decay: EMA of the encoder (the representation is read from the EMA encoder).
        hflip: random horizontal flips while training. ``None`` (default) flips unless the data are known not
            to be mirror-symmetric: ``pretrain`` passes its dataset's ``DatasetSpec.hflip`` (False for digits);
            a learner built by hand with ``None`` flips, as score_sde does.
    """

    transform = staticmethod(drl_transform)
    eval_transform = staticmethod(to_unit_range)
    gradient_clip_val = 1.0
    cosine_decay = False  # score_sde: constant rate after the warm-up
    variational = False

    def __init__(
        self,
        batch_size_per_device: int = 128,
        num_classes: int = 10,
        knn_k: int | None = None,
        knn_t: float | None = None,
        code_dim: int = 64,
        time_dependent: bool = True,
        encoder_config: dict | str = "fmnist",
        unet_config: dict | str = "fmnist_small",
        sampler: str = "uniform_t",
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        sigma_range: Sequence[float] | None = None,
        conditional: bool = True,
        beta: float = 1.0,
        l1_weight: float = 0.0,
        readout_t: Sequence[float] = (0.0, 0.5, 1.0),
        lr: float = 5e-4,
        warmup_steps: int = 100,
        ema_decay: float = 0.999,
        seed: int = 0,
        in_chans: int | None = None,
        hflip: bool | None = None,
        online_classifier: bool = True,
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
        self.noise = noise_sampler(sampler, sigma_min, sigma_max, sigma_range)
        self.encoder, _ = build_encoder(encoder_config, code_dim, time_dependent, self.variational, in_chans)
        self.score_net = build_score_net(unet_config, in_chans)
        self._check_sizes()
        self.code_proj = nn.Linear(code_dim, self.score_net.time_embedding.linear_2.out_features)
        self.conditional, self.beta, self.l1_weight = conditional, float(beta), float(l1_weight)
        self.set_hflip(hflip)
        self.readout_t = check_readout_t(readout_t) if time_dependent else (0.0,)
        self.ema = EMA(self.encoder, decay=ema_decay)
        self._backbone_cache: dict[str, DRLBackbone] = {}  # a dict, so Lightning does not save it twice
        self.init_online_classifier()

    def _check_sizes(self) -> None:
        enc, unet = self.encoder, self.score_net.config
        if enc.image_size != unet.sample_size:
            raise InputError(
                f"encoder image size {enc.image_size} ≠ score-net image size {unet.sample_size}; "
                "both networks see the same images"
            )
        if not enc.in_chans == unet.in_channels == unet.out_channels:
            raise InputError(
                f"encoder takes {enc.in_chans} channel(s) but the score net maps "
                f"{unet.in_channels} → {unet.out_channels}; they must all match"
            )

    # -- the algorithm --------------------------------------------------------------------------------
    def encode(
        self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z = E_φ(x0[, t]) and the per-image regulariser (β KL for VDRL, plus L1), in pixel-summed units."""
        mean, logvar = self.encoder(x0, t)
        z, penalty = mean, torch.zeros(x0.shape[0], device=x0.device)
        if self.variational:
            z = reparameterise(mean, logvar, generator)
            penalty = penalty + self.beta * gaussian_kl(mean, logvar)
        if self.l1_weight:
            penalty = penalty + self.l1_weight * z.float().abs().sum(dim=1)
        return z, penalty

    def score(self, x_t: torch.Tensor, sigma: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """s_θ(x_t, σ, z) = unet(x_t, σ, class_labels = Linear(z)) / σ (the U-Net divides by σ itself)."""
        return self.score_net(x_t, sigma, class_labels=self.code_proj(z)).sample

    def view_loss(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The joint DSM loss (plus the code's regulariser) on flipped images ``x0`` in [-1, 1]."""
        penalty = {}

        def score_fn(x_t, sigma, t):
            if self.conditional:
                z, penalty["z"] = self.encode(x0, t, generator)
            else:
                z = torch.zeros(x0.shape[0], self.encoder.code_dim, device=x0.device)
            return self.score(x_t, sigma, z)

        loss = ve_dsm_loss(score_fn, x0, self.noise, generator)
        if "z" in penalty:
            loss = loss + penalty["z"].mean() / x0[0].numel()
        return loss

    def after_optimizer_step(self) -> None:
        self.ema.update(self.encoder)

    # -- representation --------------------------------------------------------------------------------
    @property
    def timm_architecture(self) -> str:
        if self.encoder.time_dependent:
            return "vdrl_time_encoder_fmnist" if self.variational else "drl_time_encoder_fmnist"
        return "drl_encoder_fmnist"

    def _wrap(self, key: str, encoder: nn.Module) -> DRLBackbone:
        cached = self._backbone_cache.get(key)
        if cached is None or cached.encoder is not encoder:
            readout = self.readout_t if self.encoder.time_dependent else None
            cached = self._backbone_cache[key] = drl_backbone(encoder=encoder, readout_t=readout)
        return cached

    @property
    def backbone(self) -> DRLBackbone:
        """The trainable encoder as a backbone, for fine-tuning (shares its weights; not a registered
        sub-module)."""
        return self._wrap("backbone", self.encoder)

    @property
    def feature_backbone(self) -> DRLBackbone:
        """The EMA encoder as a backbone: the representation (export, frozen probes, ``forward``)."""
        return self._wrap("ema", self.ema.module)


class VDRL(DRL):
    """VDRL: DRL with a stochastic encoder q_φ(z | x0[, t]), reparameterisation and a β-weighted KL to N(0, I)."""

    variational = True
