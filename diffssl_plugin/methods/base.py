"""What every learner shares: lightly's method interface, step-seeded randomness and step-indexed data.

A learner is a LightningModule with lightly's constructor arguments ``(batch_size_per_device, num_classes,
knn_k, knn_t)``, a ``backbone`` that honours timm's contract, ``forward(x) = backbone(x)``, and a
``training_loss(images, generator)``: the paper's algorithm box. Everything else (optimiser, data order,
checkpoints, budget) is here or in :mod:`diffssl_plugin.methods.training`.

**Exact resume.** The batch at optimisation step ``s`` and all the randomness of that step (augmentations,
timesteps, noise) are functions of ``(seed, s)`` only, so a run interrupted at any step and resumed from its
checkpoint takes exactly the same steps as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from ..backbones.sdpa import cpu_math_attention

BatchTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class StepBatches(Dataset):
    """Item ``s`` is the batch of optimisation step ``s``: images as float [0, 1] and their (unused) labels.

    Each epoch is a permutation fixed by ``(seed, epoch)``; under DDP, rank ``r`` of ``W`` takes rows
    ``r::W`` of the global batch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        global_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_steps: int = 10**9,
    ):
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {world_size} processes")
        if len(images) < global_batch_size:
            raise ValueError(f"dataset of {len(images)} images is smaller than one batch ({global_batch_size})")
        self.images, self.labels = images, labels
        self.batch, self.seed, self.rank, self.world = global_batch_size, seed, rank, world_size
        self.steps_per_epoch = len(images) // global_batch_size
        self.num_steps = num_steps
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.images), generator=gen)
        idx = self._perm[pos * self.batch : (pos + 1) * self.batch][self.rank :: self.world]
        return self.images[idx].float().div_(255.0), self.labels[idx]


class StartAt(Sampler[int]):
    """Indices ``start, start+1, …, end-1``: the steps still to run after a resume."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end

    def __iter__(self):
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return max(0, self.end - self.start)


def hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip of a batch (one coin per image, no Python loop over images)."""
    coins = torch.rand(images.shape[0], generator=generator).to(images.device) < 0.5
    return torch.where(coins.view(-1, 1, 1, 1), images.flip(-1), images)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] → [-1, 1], the input range of diffusion models."""
    return images * 2.0 - 1.0


class SSLMethod(pl.LightningModule):
    """Base of every learner (see the module docstring). Subclasses define ``training_loss`` and ``backbone``."""

    #: registered timm name whose factory rebuilds this learner's exported backbone from its model_args
    timm_architecture: str = ""
    #: per-batch augmentation, ``transform(images_in_0_1, generator) -> images`` (set by each learner)
    transform: BatchTransform | None = None

    def __init__(
        self,
        batch_size_per_device: int = 128,
        num_classes: int = 10,
        knn_k: int | None = None,
        knn_t: float | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.batch_size_per_device, self.num_classes = batch_size_per_device, num_classes
        self.knn_k, self.knn_t = knn_k, knn_t
        self.lr, self.weight_decay, self.warmup_steps, self.seed = lr, weight_decay, warmup_steps, seed

    # -- the algorithm -------------------------------------------------------------------------------
    def training_loss(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    @property
    def backbone(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    # -- Lightning plumbing --------------------------------------------------------------------------
    def step_generator(self) -> torch.Generator:
        """The random source of the current step: a function of (seed, global step, rank) only."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.global_step) * 1009 + self.global_rank)

    def training_step(self, batch, batch_idx):
        images, _ = batch
        with cpu_math_attention(images.device):  # under bf16 autocast on the CPU (see backbones/sdpa.py)
            loss = self.training_loss(images, self.step_generator())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{type(self).__name__}: loss became {loss.item()} at step {self.global_step}; lower the learning rate"
            )
        self.log("train_loss", loss, prog_bar=True, sync_dist=False)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Per-step bookkeeping after the weights change (e.g. an EMA update). It runs before any callback's
        ``on_train_batch_end``, so a checkpoint written at step s holds exactly s updates."""

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        warmup = max(1, self.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def flops_per_image(self, images: torch.Tensor) -> float:
        """Training FLOPs (forward + backward) per image, counted once with ``torch.utils.flop_counter``."""
        from torch.utils.flop_counter import FlopCounterMode

        gen = torch.Generator().manual_seed(0)
        try:
            # attention counted as the math backend's matmuls, the kernels a bf16 training step runs
            with FlopCounterMode(display=False) as counter, cpu_math_attention(images.device, always=True):
                self.training_loss(images, gen).backward()
        except RuntimeError:
            # torch's per-module tracker (backward hooks) rejects autograd.grad with respect to a module's leaf
            # input (MDSM's double backprop on unpadded 32×32 images): count again without the module breakdown
            self.zero_grad(set_to_none=True)
            counter = FlopCounterMode(display=False)
            counter.mod_tracker = _NoModuleTracker()
            with counter, cpu_math_attention(images.device, always=True):
                self.training_loss(images, torch.Generator().manual_seed(0)).backward()
        self.zero_grad(set_to_none=True)
        return counter.get_total_flops() / images.shape[0]


class _NoModuleTracker:
    """Stands in for ``FlopCounterMode``'s module tracker: every FLOP is counted under "Global" only."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None
