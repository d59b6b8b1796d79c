"""What every learner shares: lightly's method interface, step-seeded randomness and step-indexed data.

A learner is a LightningModule with lightly's constructor arguments ``(batch_size_per_device, num_classes,
knn_k, knn_t)``, a ``backbone`` that honours timm's contract, ``forward(x) = backbone(x)``, and a
``training_loss(images, generator)``: the paper's algorithm box. Everything else (optimiser, data order,
checkpoints, budget) is here or in :mod:`diffssl_plugin.methods.training`.

**Exact resume.** The batch at optimisation step ``s`` and all the randomness of that step (augmentations,
timesteps, noise: the step's generator; dropout and any other draw from torch's global RNG, inside lightly and
timm modules too: the global RNG, forked and seeded for the step) are functions of ``(seed, s, rank)`` only
(with gradient accumulation, of the micro-batch index ``s × accumulation + k``), so a run killed at any point
and resumed from its last checkpoint takes exactly the same steps as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from lightly.utils.benchmarking import OnlineLinearClassifier, knn_predict
from torch import nn
from torch.utils.data import Dataset, Sampler

from ..backbones.memory_format import use_preferred_memory_format
from ..backbones.sdpa import cpu_math_attention
from ..data.flip import hflip
from ..errors import InputError
from ..optim import warmup_cosine
from .lightly_api import FeatureBank, eval_mode, first_view, unpack_batch

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
    """Indices ``start, start+1, …, end-1``: the steps still to run after a resume.

    Its length is ``end``, the whole stream's, not the number of indices left: Lightning restores its count of
    the epoch's batches from the checkpoint (``start``) and ends the epoch at ``len``, so the epoch ends
    exactly when the stream does (with ``end − start`` it would end early and start the stream over)."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end

    def __iter__(self):
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return max(0, self.end)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] → [-1, 1], the input range of diffusion models."""
    return images * 2.0 - 1.0


def flip_to_unit_range(images: torch.Tensor, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
    """The diffusion learners' training augmentation (DDPM's and score_sde's): a random horizontal flip (skipped
    with ``flip=False``: a mirrored digit is not a digit), then [0, 1] → [-1, 1]."""
    return to_unit_range(hflip(images, generator) if flip else images)


class SSLMethod(pl.LightningModule):
    """Base of every learner (see the module docstring). Subclasses define ``view_loss``, ``backbone`` and
    call :meth:`init_online_classifier` at the end of their ``__init__``.

    **Two backbones.** ``backbone`` is the *trainable* network (what ``FinetuneClassifier(model=learner.backbone)``
    fine-tunes); ``feature_backbone`` is what the learner's representation is read from: the EMA copy for
    learners that keep one (DDAE, DRL, VDRL), else the same module. ``forward`` (lightly's frozen probes:
    ``LinearClassifier``, ``KNNClassifier``), the online classifier and the export read ``feature_backbone``.
    """

    #: registered timm name whose factory rebuilds this learner's exported backbone from its model_args
    timm_architecture: str = ""
    #: per-batch augmentation, ``transform(images_in_0_1, generator) -> views`` (set by each learner)
    transform: BatchTransform | None = None
    #: deterministic map from images in [0, 1] to the backbone's input space (evaluation, online classifier)
    eval_transform: Callable[[torch.Tensor], torch.Tensor] = staticmethod(lambda images: images)
    #: gradient-norm clip of the learner's parameters (None: none), applied by ``configure_gradient_clipping``
    gradient_clip_val: float | None = None
    #: cosine decay over the step budget after the warm-up (False: constant after warm-up); for a wall-clock
    #: budget the horizon is set once the step time is measured (``training_callbacks.ScheduleHorizon``)
    cosine_decay: bool = True

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
        online_classifier: bool = True,
    ):
        super().__init__()
        self.batch_size_per_device, self.num_classes = batch_size_per_device, num_classes
        self.knn_k, self.knn_t = knn_k, knn_t if knn_t is not None else 0.1
        self.lr, self.weight_decay, self.warmup_steps, self.seed = lr, weight_decay, warmup_steps, seed
        self._online = online_classifier
        self.online_classifier: OnlineLinearClassifier | None = None
        self._micro = (-1, 0)  # (global step, micro-batch index within it) of the last training step
        self._knn = FeatureBank()

    def init_online_classifier(self) -> None:
        """lightly's ``OnlineLinearClassifier`` on ``feature_backbone.num_features`` (when enabled)."""
        if self._online:
            dim = int(self.feature_backbone.num_features)
            self.online_classifier = OnlineLinearClassifier(dim, self.num_classes, topk=(1,))

    def set_hflip(self, hflip: bool | None) -> None:
        """Random horizontal flips in ``transform`` (a :func:`flip_to_unit_range`-style one) or not: ``None``
        flips unless the data are known not to be mirror-symmetric (``pretrain`` passes its dataset's
        ``DatasetSpec.hflip``, False for digits)."""
        self.hflip = True if hflip is None else bool(hflip)
        if not self.hflip:
            self.transform = functools.partial(type(self).transform, flip=False)

    # -- the algorithm -------------------------------------------------------------------------------
    def view_loss(self, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The paper's loss on augmented views (the output of ``transform``)."""
        raise NotImplementedError

    def training_loss(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The loss of a batch of raw images in [0, 1]: ``transform`` then :meth:`view_loss`."""
        return self.view_loss(self.transform(images, generator), generator)

    def collate_views(self, views: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """lightly-style views (a tensor, or a list of one tensor) as ``transform`` would give them."""
        if isinstance(views, torch.Tensor):
            return views
        if len(views) != 1:
            raise InputError(f"{type(self).__name__} takes one view per image, got {len(views)}")
        return views[0]

    @property
    def backbone(self) -> nn.Module:
        raise NotImplementedError

    @property
    def feature_backbone(self) -> nn.Module:
        """The network the representation is read from (the trainable ``backbone`` unless overridden)."""
        return self.backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of ``x`` (in the backbone's input space) from ``feature_backbone``."""
        return self.feature_backbone(x)

    # -- randomness ----------------------------------------------------------------------------------
    def _micro_index(self) -> int:
        """Index of the current micro-batch in the whole run: ``global_step × accumulation + k``."""
        step, k = self._micro
        k = k + 1 if step == self.global_step else 0
        self._micro = (self.global_step, k)
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return self.global_step * accumulate + k

    def step_generator(self, index: int | None = None) -> torch.Generator:
        """The random source of a micro-batch: a function of (seed, micro-batch index, rank) only."""
        index = self.global_step if index is None else index
        return torch.Generator().manual_seed((self.seed * 1_000_003 + index) * 1009 + self.global_rank)

    @contextlib.contextmanager
    def step_randomness(self):
        """The step's generator, with torch's global CPU (and current CUDA device's) RNG forked and seeded
        from the same (seed, step, rank) for the duration: dropout masks and any draw inside lightly/timm
        modules repeat exactly after a resume, and the global stream outside the step is left untouched."""
        gen = self.step_generator(self._micro_index())
        seed = int(gen.initial_seed())
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else [], device_type="cuda"):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)
            yield gen

    # -- Lightning plumbing --------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # before Lightning moves the module, wraps it in DDP and builds the optimiser: DDP's buckets then
        # match the weights' layout
        use_preferred_memory_format(self)  # channels-last for backbones that run faster in it

    def training_step(self, batch, batch_idx):
        images, views, targets = unpack_batch(batch)
        device = (images if images is not None else first_view(views)).device
        with self.step_randomness() as generator, cpu_math_attention(device):  # bf16 on the CPU: backbones/sdpa.py
            if views is None:
                loss = self.training_loss(images, generator)
            else:
                loss = self.view_loss(self.collate_views(views), generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{type(self).__name__}: loss became {loss.item()} at step {self.global_step}; lower the learning rate"
            )
        self.log("train_loss", loss, prog_bar=True, sync_dist=False)
        if self.online_classifier is not None and targets is not None:
            x = self.eval_transform(images) if views is None else first_view(views)
            with torch.no_grad(), eval_mode(self.feature_backbone) as net:
                features = net(x).flatten(start_dim=1)
            cls_loss, cls_log = self.online_classifier.training_step((features, targets), batch_idx)
            self.log_dict(cls_log, sync_dist=True, batch_size=len(targets))
            loss = loss + cls_loss
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        """Online linear top-1 (``val_online_cls_top1``) and, with ``knn_k`` and two validation loaders
        ``[knn_train_loader, val_loader]`` (lightly's layout), kNN top-1 (``val_knn_top1``). Batches are
        ``(images_in_0_1, labels)`` or lightly's ``(images, targets, filenames)`` in the backbone's input space."""
        images, views, targets = unpack_batch(batch)
        x = self.eval_transform(images) if views is None else first_view(views)
        features = self(x).flatten(start_dim=1)
        loaders = self.trainer.val_dataloaders if self._trainer is not None else None
        two = isinstance(loaders, (list, tuple)) and len(loaders) >= 2
        if self.knn_k and two and dataloader_idx == 0:
            self._knn.add(features, targets)
            return None
        if self.online_classifier is not None:
            _, cls_log = self.online_classifier.validation_step((features, targets), batch_idx)
            self.log_dict(cls_log, prog_bar=True, sync_dist=True, batch_size=len(targets), add_dataloader_idx=False)
        if self.knn_k and two:
            bank, labels = self._knn.bank(self.all_gather)
            query = nn.functional.normalize(features.to(bank.dtype), dim=1)
            pred = knn_predict(query, bank, labels, self.num_classes, self.knn_k, self.knn_t)
            top1 = (pred[:, 0] == targets).float().mean()
            self.log(
                "val_knn_top1", top1, prog_bar=True, sync_dist=True, batch_size=len(targets), add_dataloader_idx=False
            )
        return None

    def on_validation_epoch_start(self) -> None:
        self._knn.reset()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Per-step bookkeeping after the weights change (e.g. an EMA update). It runs before any callback's
        ``on_train_batch_end``, so a checkpoint written at step s holds exactly s updates."""

    def learner_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the algorithm itself (the online classifier's excluded)."""
        skip = {id(p) for p in self.online_classifier.parameters()} if self.online_classifier is not None else set()
        return [p for p in self.parameters() if p.requires_grad and id(p) not in skip]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip the learner's gradient norm at ``gradient_clip_val`` (the Trainer's value when it sets one,
        else the learner's own), leaving the online classifier out, so ``Trainer().fit(learner)`` trains with
        the paper's clipping."""
        clip = gradient_clip_val if gradient_clip_val is not None else self.gradient_clip_val
        if not clip:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm)
            return
        torch.nn.utils.clip_grad_norm_(self.learner_parameters(), clip)

    def total_steps(self) -> int | None:
        """The schedule's horizon: the Trainer's ``estimated_stepping_batches`` (``max_steps`` when a step
        budget is set), None when it is unknown (a wall-clock budget, unbounded epochs) or no Trainer."""
        if self._trainer is None:
            return None
        total = self.trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) and total > 0 else None

    def lr_schedule(self, optimizer: torch.optim.Optimizer, end_value: float = 0.0) -> dict:
        """The per-step :func:`~diffssl_plugin.optim.warmup_cosine` schedule of ``optimizer``."""
        total = self.total_steps() if self.cosine_decay else None
        sched = warmup_cosine(optimizer, self.warmup_steps, total, end_value=end_value)
        return {"scheduler": sched, "interval": "step"}

    def optimizer_groups(self) -> list[dict]:
        """Parameter groups of the optimiser: the learner's, then the online classifier's (no weight decay)."""
        groups = [{"params": self.learner_parameters()}]
        if self.online_classifier is not None:
            groups.append({"params": list(self.online_classifier.parameters()), "weight_decay": 0.0})
        return groups

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.optimizer_groups(), lr=self.lr, weight_decay=self.weight_decay)
        return {"optimizer": opt, "lr_scheduler": self.lr_schedule(opt)}

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
