"""MDSM: Learning energy-based models in high-dimensional spaces with multi-scale denoising score matching
(Li, Chen & Sommer, arXiv 1910.07762).

Training (official ``train.py``):

    σ_1 … σ_B  = a fixed grid over the batch (log-spaced 0.1 → 3 for Fashion-MNIST, linear 0.05 → 1.2 for CIFAR)
    repeat
        x ~ data in [0, 1] (no augmentation)
        x̃_i = x_i + σ_i ε_i
        take an Adam step on  (1/B) Σ_i ‖x_i − x̃_i + σ0² ∇E(x̃_i)‖² / (σ_i² σ0⁴),  σ0 = 0.1
    until the budget is spent

One noise-unconditional energy ``E(x)`` then serves for sampling (annealed Langevin + one denoising jump),
denoising, inpainting, outlier detection (``E`` as the score) and, read through timm's contract, as a feature
backbone (its penultimate activations ``h``); see :mod:`diffssl_plugin.diffusion.energy` and
:mod:`diffssl_plugin.eval.ood`.

Fixed relative to the official code: we pretrain on the Fashion-MNIST *training* images (its loader hard-codes the
10k test split, which our outlier detection uses as the in-distribution set). Choices for CPU budgets: the
default network is Res12 at width 16 (the paper's 64 is ``width=64``); Adam β = (0.9, 0.95) as in the paper with
lr 5e-4 (the paper's 1e-4 is tuned for 100k iterations; a few hundred CPU steps learn little at 1e-4), cosine
decay to 1e-6 when the step budget is known (the paper's schedule over 100k steps), constant otherwise.
"""

from __future__ import annotations

import math

import torch

from ..backbones.ebm import EBM_PRESETS, EnergyResNet
from ..diffusion.energy import SIGMA0, SIGMA_GRIDS, mdsm_loss, sigma_grid
from ..errors import check_name
from .base import SSLMethod


def mdsm_transform(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MDSM's data pipeline: images in [0, 1], no augmentation (the official loaders use ``ToTensor`` only; CIFAR
    is loaded with ``flip=False``). The Fashion-MNIST 28 → 32 zero padding follows in
    :meth:`MDSM.training_loss`, before noise is added (the official loader's order)."""
    return images.float()


class MDSM(SSLMethod):
    """A quadratic-output energy ResNet trained with multi-scale denoising score matching."""

    transform = staticmethod(mdsm_transform)

    def __init__(
        self,
        batch_size_per_device: int = 128,
        num_classes: int = 10,
        knn_k: int | None = None,
        knn_t: float | None = None,
        net: str = "res12",
        width: int | None = 16,
        sigma_grid: str | tuple[float, float, str] = "fmnist",
        sigma0: float = SIGMA0,
        lr: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        min_lr: float = 1e-6,
        global_pool: str = "flatten",
        seed: int = 0,
        in_chans: int | None = None,
        img_size: int | None = None,
        online_classifier: bool = True,
    ):
        super().__init__(
            batch_size_per_device, num_classes, knn_k, knn_t, lr=lr, seed=seed, online_classifier=online_classifier
        )
        self.save_hyperparameters()
        config = dict(EBM_PRESETS[check_name("EBM preset", net, EBM_PRESETS)])
        overrides = {"width": width, "in_chans": in_chans, "img_size": img_size}
        config.update({k: v for k, v in overrides.items() if v is not None})
        if config["img_size"] > config["net_size"]:
            config["net_size"] = 8 * math.ceil(config["img_size"] / 8)
        self.energy_net = EnergyResNet(**config, global_pool=global_pool)
        # the quadratic term's bias only shifts the energy: the score −∇ₓE, which is all the loss sees, has no
        # gradient for it, and a parameter without a gradient stops DDP
        self.energy_net.energy_head.quad.bias.requires_grad_(False)
        if isinstance(sigma_grid, str):
            sigma_grid = SIGMA_GRIDS[check_name("σ grid", sigma_grid, SIGMA_GRIDS)]
        self.sigma_range = tuple(sigma_grid)
        self.sigma0, self.betas, self.min_lr = sigma0, tuple(betas), min_lr
        self.init_online_classifier()

    def sigmas(self, batch_size: int) -> torch.Tensor:
        """The fixed per-sample σ grid for a batch of ``batch_size`` images."""
        return sigma_grid(batch_size, *self.sigma_range)

    def view_loss(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The multi-scale DSM loss of images ``x`` in [0, 1]."""
        # pad 28 → 32 before noising, as the official loader does: the loss covers the padded image
        x = self.energy_net.pad_input(x)
        return mdsm_loss(self.energy_net.energy, x, self.sigmas(x.shape[0]).to(x.device), generator, self.sigma0)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """``E(x)`` of images in [0, 1] (noisy ones allowed; ``img_size`` or padded ``net_size``), shape (B,)."""
        return self.energy_net.energy(x)

    @property
    def backbone(self) -> EnergyResNet:
        """The energy network itself: ``forward`` gives its penultimate features, ``energy`` the energy."""
        return self.energy_net

    @property
    def timm_architecture(self) -> str:
        """The registered timm name the export is rebuilt with (its ``model_args`` carry the full config)."""
        return "mdsm_ebm_cifar10" if self.energy_net.blocks_per_stage == 3 else "mdsm_ebm_fmnist"

    def configure_optimizers(self):
        """Adam with cosine decay from ``lr`` to ``min_lr`` over the step budget (lightly's convention: the end
        value is reached at the last step; no warm-up, as the paper), constant while the horizon is unknown."""
        opt = torch.optim.Adam(self.optimizer_groups(), lr=self.lr, betas=self.betas)
        return {"optimizer": opt, "lr_scheduler": self.lr_schedule(opt, end_value=self.min_lr / self.lr)}
