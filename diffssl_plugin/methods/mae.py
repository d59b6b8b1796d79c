"""MAE: masked autoencoders are scalable vision learners (He et al., CVPR 2022), built from lightly's blocks.

    repeat
        x ~ data, random-resized crop (area ∈ [0.2, 1]) and horizontal flip
        split x into P×P patches; keep a random 25% of them (mask ratio 0.75), the class token always
        e = encoder(kept patches)                  timm ViT in lightly's MaskedVisionTransformerTIMM
        d = decoder(embed(e) + mask tokens at the masked positions)
                                                   lightly's MaskedVisionTransformerDecoderTIMM
        p̂ = prediction head(d at the masked positions)
        target = each masked patch normalised to zero mean and unit variance (normalised-pixel loss)
        take a gradient step on the mean squared error of (p̂, target) over masked patches only
    until the budget is spent

Representation: the encoder ViT alone, on the whole image
(:class:`~diffssl_plugin.backbones.baselines.MAEViT`).

**Masking.** lightly's ``random_token_mask`` draws from the global RNG (it takes a device, not a generator),
so a resumed run would mask differently; :func:`random_token_mask` below draws the same kind of mask (argsort
of uniform noise, class token kept) from the step's generator.

Choices for CPU-minute budgets (the paper trains 800-1600 epochs): a ViT-Tiny encoder with 4-pixel patches
(7×7 tokens for 28 px; 0.55 training GFLOP per image, about 340 images/s on 2 cores with bf16 autocast, so
tens of thousands of images in a 3-minute budget), a 2-block 128-d decoder (the paper's ablation: a shallow,
narrow decoder costs little and loses little for fine-tuning), and AdamW with lr 1.5e-3, betas (0.9, 0.95),
weight decay 0.05 and 20 warm-up steps (the paper: base lr 1.5e-4·batch/256 and 40 warm-up epochs, far too
slow for a few hundred steps). ``diffssl_plugin/configs/mae_cifar10.yaml`` keeps lightly's optimiser settings.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from lightly.models import utils
from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
from torch import nn

from ..backbones.baselines import MAEViT, norm_stats
from ..backbones.checks import check_images
from .augment import normalize, random_resized_crop
from .base import SSLMethod


def mae_transform(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """lightly's ``MAETransform`` batch-wise: random-resized crop (area ∈ [0.2, 1], bicubic) with a horizontal
    flip, then the backbone's mean/std."""
    x = random_resized_crop(images, generator, scale=(0.2, 1.0), mode="bicubic")
    return normalize(x, *norm_stats(images.shape[1]))


def mae_eval_transform(images: torch.Tensor) -> torch.Tensor:
    """Evaluation input of the ViT: images in [0, 1] normalised with the backbone's mean/std."""
    return normalize(images, *norm_stats(images.shape[1]))


def random_token_mask(
    batch_size: int, num_patches: int, mask_ratio: float, generator: torch.Generator, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx_keep, idx_mask) over the sequence [class token, patches]: the class token (index 0) is always
    kept, ``int(num_patches·(1−mask_ratio))`` random patches are kept too, the rest are masked (as in
    lightly)."""
    num_keep = int(num_patches * (1 - mask_ratio))
    order = torch.argsort(torch.rand(batch_size, num_patches, generator=generator), dim=1).to(device) + 1
    cls = torch.zeros(batch_size, 1, dtype=order.dtype, device=order.device)
    return torch.cat([cls, order[:, :num_keep]], dim=1), order[:, num_keep:]


class MAE(SSLMethod):
    """Masked autoencoder with a ViT-Tiny/4 encoder (``mae_vit_tiny_p4``) and a small ViT decoder."""

    transform = staticmethod(mae_transform)
    eval_transform = staticmethod(mae_eval_transform)
    timm_architecture = "mae_vit_tiny_p4"

    def __init__(
        self,
        batch_size_per_device: int = 128,
        num_classes: int = 10,
        knn_k: int | None = None,
        knn_t: float | None = None,
        mask_ratio: float = 0.75,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        lr: float = 1.5e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        img_size: int = 28,
        backbone_args: dict | None = None,
        seed: int = 0,
        in_chans: int = 1,
        online_classifier: bool = True,
    ):
        super().__init__(
            batch_size_per_device,
            num_classes,
            knn_k,
            knn_t,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            seed=seed,
            online_classifier=online_classifier,
        )
        self.save_hyperparameters()
        self.mask_ratio, self.betas = mask_ratio, tuple(betas)
        vit: MAEViT = timm.create_model(
            self.timm_architecture, in_chans=in_chans, img_size=img_size, num_classes=0, **(backbone_args or {})
        )
        self.patch_size = vit.patch_embed.patch_size[0]
        self.num_patches = vit.patch_embed.num_patches
        self.encoder = MaskedVisionTransformerTIMM(vit=vit)
        # MAE drops masked patches (idx_keep) instead of replacing them by a token: the wrapper's mask token is
        # never used, and a parameter without a gradient stops DDP
        self.encoder.mask_token.requires_grad_(False)
        self.decoder_embed = nn.Linear(vit.embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=self.num_patches,
            embed_dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_heads,
            num_prefix_tokens=vit.num_prefix_tokens,
        )
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * in_chans)
        self.init_online_classifier()

    @property
    def backbone(self) -> MAEViT:
        return self.encoder.vit

    def training_loss(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vit = self.encoder.vit
        check_images(
            images, vit.in_chans, vit.patch_embed.img_size[0], name="MAE (set img_size to the data's image size)"
        )
        return self.view_loss(self.transform(images, generator), generator)

    def view_loss(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The MAE objective on an augmented, normalised batch ``x``."""
        idx_keep, idx_mask = random_token_mask(len(x), self.num_patches, self.mask_ratio, generator, x.device)
        encoded = self.encoder.encode(x, idx_keep=idx_keep)  # visible tokens only
        visible = self.decoder_embed(encoded)
        tokens = utils.set_at_index(  # back to the full sequence
            visible.new_zeros(len(x), self.num_patches + 1, visible.shape[-1]), idx_keep, visible
        )
        decoded = self.decoder(tokens, idx_mask=idx_mask)  # mask tokens at idx_mask
        prediction = self.decoder_pred(utils.get_at_index(decoded, idx_mask))
        patches = utils.patchify(x, self.patch_size)  # (B, N, P·P·C)
        target = utils.normalize_mean_var(utils.get_at_index(patches, idx_mask - 1))  # per-patch normalised
        return F.mse_loss(prediction.float(), target.float())

    def configure_optimizers(self):
        decay, no_decay = utils.get_weight_decay_parameters(
            [self.encoder, self.decoder_embed, self.decoder, self.decoder_pred]
        )
        opt = torch.optim.AdamW(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}, *self.optimizer_groups()[1:]],
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=self.betas,
        )
        return {"optimizer": opt, "lr_scheduler": self.lr_schedule(opt)}
