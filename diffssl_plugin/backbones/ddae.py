"""DDAE backbone: features of an unconditional diffusion U-Net (diffusers ``UNet2DModel``) at any block and
timestep, honouring timm's backbone contract.

DDAE (Xiang et al., ICCV 2023) treats a trained denoiser as an autoencoder: noise the clean image to a small
timestep, run the network once, read an intermediate decoder activation and pool it.

**Block names**, in forward order: ``down{i}`` (output of ``down_blocks[i]``, after its downsampler), ``mid``,
``up{i}.{j}`` (the j-th residual block of ``up_blocks[i]``, after its attention if it has one, before the
upsampler) and ``up{i}`` (output of ``up_blocks[i]``, after its upsampler). DDAE's hook names count the up-path
residual blocks from 1: ``out_k`` is ``up{i}.{j}`` with ``k = i·(layers_per_block + 1) + j + 1``. For the DDPM
CIFAR-10 U-Net (``google/ddpm-cifar10-32``), DDAE's chosen ``out_6`` at DDAE ``t = 11`` is our ``up1.2`` at
``t = 10`` (timesteps here are 0-indexed diffusers timesteps, see :mod:`diffssl_plugin.diffusion.schedule`).

**One forward per timestep.** Features are captured by forward hooks on the real diffusers forward, and the
forward stops right after the last block needed; there is no second copy of the U-Net's forward. A single
block (``forward``, ``forward_features``) is read without hooks: :func:`truncated_unet` is a view of the U-Net
(its own modules, new containers) whose output is that block's, so diffusers' forward itself ends there. That
path has no hook registration and no exception, so ``torch.compile(model, fullgraph=True)`` traces the forward;
the hook path (several blocks, edits) runs eagerly (dynamo cannot trace a hook registered inside a forward).

**Edits (DifFeed's feedback).** The same hooks can *replace* outputs: ``extract(..., edits={unit: fn})``
makes the named unit's output ``fn(output)`` before anything downstream reads it. Units are the blocks above
plus the modules whose outputs the U-Net stores as skip connections: ``conv_in`` and ``down{i}.{j}`` (the j-th
residual block of ``down_blocks[i]``, after its attention if any). A down block returns ``(hidden, skips)``
where ``hidden`` *is* ``skips[-1]`` (its downsampler's output, or its last residual block's when it has none),
so an edit of ``down{i}`` replaces both: the next block and the decoder block that reads that skip see the
edited tensor (diffssl adds feedback "before the output is stored as a skip"); the block's other skips are
edited through their ``down{i}.{j}`` names. :meth:`DDAEBackbone.mirror_block` names, for each decoder unit,
the encoder unit whose skip it consumes (its mirror in the U; diffssl's pairs ``b → 38 − b`` in ADM's
block numbering).

**Noise.** With ``noise_seed`` set (default 0) each image gets its own ε at each timestep, a function of
(seed, t, the image's index in its dataset) (:func:`~diffssl_plugin.diffusion.noise.indexed_noise`): independent
across images and timesteps, as DDAE's and diffssl's fresh draws are, yet reproducible and independent of batch
size, sharding and the OOM back-off (the feature extractor passes each image's dataset index as ``index``;
without it the index is the position in the batch). ``noise_seed=None`` draws fresh noise at each call.

Inputs are images normalised to [-1, 1] (mean = std = 0.5).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from diffusers import UNet2DModel
from torch import nn

from ..diffusion.noise import indexed_noise
from ..diffusion.schedule import DDPM_DEFAULTS, check_timesteps, ddpm_scheduler
from ..errors import InputError, check_name
from ..weights import load_unet_folder
from .pooling import pool_cells, pool_features, pooled_dim
from .sdpa import cpu_math_attention
from .timm_contract import TimmBackboneMixin, create_backbone, data_cfg
from .unet_blocks import (
    capture_units,
    truncated_unet,
    unet_block_modules,
    unet_encoder_units,
    unet_skip_mirrors,
    unet_unit_shapes,
)
from .unet_presets import UNET_PRESETS, unet_config_of, unet_group_matcher  # noqa: F401  (UNET_PRESETS: re-exported)


class DDAEBackbone(TimmBackboneMixin, nn.Module):
    """A diffusers U-Net read as a feature extractor at ``block`` and ``timestep``, pooled by ``pool``.

    Args:
        unet_config: ``UNet2DModel`` config dict, or the name of a preset in :data:`UNET_PRESETS`.
        timestep: 0-indexed diffusers timestep the image is noised to before the forward.
        block: block read by ``forward_features`` (see the module docstring for names).
        pool: ``"avg"`` (DDAE's global average pool), ``"avgKxK"`` or ``"none"``.
        noise_seed: seed of the per-(image, timestep) noise; ``None`` draws fresh noise at each call.
        scheduler_config: overrides of the DDPM schedule (``num_train_timesteps``, ``beta_*``).
        num_classes: 0 for a feature extractor (timm convention), else a linear classifier is added.
        in_chans: timm's channel argument; overrides the U-Net's input/output channels.
        global_pool: timm's pooling argument; an alias of ``pool`` ('' means 'none').
        dynamic_img_size: accept sizes other than the U-Net's ``sample_size`` (multiples of its total stride).
        unet: an existing ``UNet2DModel`` to wrap (its weights are shared, not copied).
        unit_shapes: ``unet``'s :attr:`unit_shapes` if known (``with_settings`` passes them); else they come
            from a forward on the ``meta`` device (shapes only: no weights, no arithmetic).
    """

    timm_family = "ddae_unet"
    first_conv = "unet.conv_in"

    def __init__(
        self,
        unet_config: dict | str = "fmnist_small",
        timestep: int = 10,
        block: str = "mid",
        pool: str = "avg",
        noise_seed: int | None = 0,
        scheduler_config: dict | None = None,
        num_classes: int = 0,
        in_chans: int | None = None,
        global_pool: str | None = None,
        dynamic_img_size: bool = False,
        drop_rate: float = 0.0,
        unet: UNet2DModel | None = None,
        unit_shapes: Mapping[str, tuple[int, int, int]] | None = None,
        **kwargs,
    ):
        super().__init__()
        kwargs.pop("pretrained_cfg", None)
        if kwargs:
            raise TypeError(f"DDAEBackbone got unexpected arguments: {sorted(kwargs)}")
        if unet is None:
            unet = UNet2DModel(**unet_config_of(unet_config, in_chans))
        self.unet = unet
        self.unet_config = {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet.config).items() if not k.startswith("_")
        }
        self.scheduler_config = {**DDPM_DEFAULTS, **(scheduler_config or {})}
        self.scheduler = ddpm_scheduler(**self.scheduler_config)
        # sqrt(ᾱ_t) and sqrt(1 - ᾱ_t) as Python numbers (the float32 values add_noise uses): noising at one
        # timestep then needs no copy of the schedule to the images' device
        alphas = self.scheduler.alphas_cumprod.float()
        self._noise_scales = list(zip(alphas.sqrt().tolist(), (1 - alphas).sqrt().tolist()))
        self.in_chans = int(unet.config.in_channels)
        self.image_size = int(unet.config.sample_size)
        self.dynamic_img_size = dynamic_img_size
        self.noise_seed = noise_seed
        self._views: dict[tuple[str, bool], UNet2DModel | None] = {}
        self.grad_checkpointing = bool(unet.is_gradient_checkpointing)
        self._blocks = unet_block_modules(unet)
        encoder = unet_encoder_units(unet)
        self._units = {**encoder, **{n: m for n, m in self._blocks.items() if n not in encoder}}
        self._order = {name: i for i, name in enumerate(self._units)}
        self._mirrors = unet_skip_mirrors(unet)
        self.unit_shapes = dict(unit_shapes) if unit_shapes is not None else unet_unit_shapes(unet)
        self.block_shapes = {n: self.unit_shapes[n] for n in self._blocks}
        self.timestep = check_timesteps([timestep], self.num_train_timesteps)[0]
        self.block = check_name("block", block, self._blocks)
        if global_pool is not None:
            pool = global_pool or "none"
        self.drop_rate = drop_rate
        self.pretrained_cfg = self.data_cfg()
        self.feature_info = self._feature_info()
        self.reset_classifier(num_classes, pool)
        self._view(self.block)  # built here, outside any torch.compile trace of the forward

    # ------------------------------------------------------------------ properties
    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    @property
    def block_names(self) -> list[str]:
        """Every block that ``extract`` can read, in forward order."""
        return list(self._blocks)

    def block_module(self, name: str) -> nn.Module:
        """The module whose output is block ``name`` (for hooks, e.g. DifFeed's feedback)."""
        return self._blocks[check_name("block", name, self._blocks)]

    @property
    def unit_names(self) -> list[str]:
        """Every unit ``extract`` can edit (the blocks, ``conv_in`` and ``down{i}.{j}``), in forward order."""
        return list(self._units)

    def mirror_block(self, decoder_block: str) -> str:
        """The encoder unit whose skip connection ``decoder_block`` (``up{i}.{j}`` or ``up{i}``) consumes."""
        return self._mirrors[check_name("decoder block", decoder_block, self._mirrors)]

    #: the extraction-noise scheme (a feature-cache key: features drawn under another scheme are not reused)
    noise_scheme = "indexed-v3"  # v2: index = position in the source array; v3: 23-bit uniforms, never ±inf

    def draw_noise(
        self, x: torch.Tensor, timestep: int | None = None, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The ε ``extract`` would use for ``x`` at ``timestep`` (default: the backbone's) for images at dataset
        positions ``index`` (default: their batch positions); fresh noise if ``noise_seed`` is None."""
        return self._noise(x, self.timestep if timestep is None else timestep, index)

    # ------------------------------------------------------------------ core: one forward, early exit
    def _noise(self, x: torch.Tensor, timestep: int, index: torch.Tensor | None) -> torch.Tensor:
        if self.noise_seed is None:
            return torch.randn_like(x)
        if index is None:
            index = torch.arange(x.shape[0], device=x.device)
        elif index.shape != (x.shape[0],):
            raise InputError(
                f"index must hold one dataset position per image, shape ({x.shape[0]},), got {tuple(index.shape)}"
            )
        return indexed_noise(self.noise_seed, timestep, index.to(x.device), x.shape[1:], x.dtype)

    def _capture(
        self,
        x_t: torch.Tensor,
        timestep: int,
        wanted: Sequence[str],
        edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the U-Net once on ``x_t`` and return the outputs of ``wanted`` units, stopping after the last.

        One block and no edits: the U-Net's :func:`truncated_unet` view ends with that block. Otherwise forward
        hooks on the whole U-Net capture the units, and the last one's hook ends the forward by raising
        (``torch.compile`` traces the first way only: hooks registered inside a forward break its graph).
        ``edits`` replace unit outputs during the forward (see the module docstring); a unit that is both
        edited and wanted is returned edited. Edits of units after the last wanted one never run.
        """
        t = torch.full((x_t.shape[0],), timestep, dtype=torch.long, device=x_t.device)
        wanted = set(wanted)
        if len(wanted) == 1 and not edits:
            (block,) = wanted
            view = self._view(block)
            if view is not None:
                with cpu_math_attention(x_t.device):
                    return {block: view(x_t, t, return_dict=False)[0]}
        with cpu_math_attention(x_t.device):
            return capture_units(self.unet, self._units, self._order, x_t, t, wanted, edits)

    def _view(self, block: str) -> UNet2DModel | None:
        """:func:`truncated_unet` of ``block``, built once (again after :meth:`set_grad_checkpointing`)."""
        key = (block, self.grad_checkpointing)
        if key not in self._views:
            self._views[key] = truncated_unet(self.unet, block) if block in self._blocks else None
        return self._views[key]

    def extract(
        self,
        x: torch.Tensor,
        timesteps: Sequence[int],
        blocks: Sequence[str],
        pool: str | None = "avg",
        *,
        noise: torch.Tensor | None = None,
        edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        index: torch.Tensor | None = None,
    ) -> dict[tuple[int, str], torch.Tensor]:
        """Features of ``blocks`` at each of ``timesteps``: ``{(t, block): tensor}``, one U-Net forward per timestep.

        ``x`` is a batch in [-1, 1]. ``pool`` is ``"avg"``, ``"avgKxK"`` or ``None``/``"none"`` (NCHW maps).
        ``noise``: the ε that noises ``x`` at every timestep (default: :meth:`draw_noise` per timestep, for
        the images at dataset positions ``index``); two calls with the same ``noise`` see the same ``x_t``.
        ``edits``: ``{unit: fn}`` replaces each named unit's output (a name of :attr:`unit_names`) by
        ``fn(output)`` during every forward, before anything downstream reads it (see the module docstring).
        """
        self._check(x)
        timesteps = check_timesteps(timesteps, self.num_train_timesteps)
        for b in blocks:
            check_name("block", b, self._blocks)
        for name, fn in (edits or {}).items():
            check_name("edit target", name, self._units)
            if not callable(fn):
                raise InputError(f"the edit of {name!r} must be a function of the unit's output, got {fn!r}")
        if edits and self.grad_checkpointing and torch.is_grad_enabled():
            raise InputError(
                "edits cannot run with gradient checkpointing on: the backward recomputes the U-Net's "
                "blocks without them; call set_grad_checkpointing(False) first"
            )
        pool = pool or "none"
        pool_cells(pool)
        if noise is not None and (not isinstance(noise, torch.Tensor) or noise.shape != x.shape):
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise InputError(f"noise must be a tensor of the images' shape {tuple(x.shape)}, got {got}")
        out: dict[tuple[int, str], torch.Tensor] = {}
        for t in timesteps:
            eps = self._noise(x, t, index) if noise is None else noise
            a, s = self._noise_scales[t]  # diffusion.schedule.add_noise at one timestep
            x_t = (a * x.float() + s * eps.float()).to(x.dtype)
            feats = self._capture(x_t, t, blocks, edits)
            for b in blocks:
                out[(t, b)] = pool_features(feats[b], pool)
        return out

    # ------------------------------------------------------------------ timm contract
    def _feature_info(self) -> list[dict]:
        """Decoder block outputs and the middle block, ordered by non-decreasing reduction (timm's rule)."""
        names = [n for n in self._blocks if n.startswith("up") and "." not in n][::-1]
        names += ["mid"] if "mid" in self._blocks else []
        info = []
        for n in names:
            c, h, _ = self.block_shapes[n]
            module = "unet.mid_block" if n == "mid" else f"unet.up_blocks.{n[2:]}"
            info.append({"num_chs": c, "reduction": self.image_size // h, "module": module, "block": n})
        return info

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer groups in forward order (layer-wise lr decay): see :func:`.unet_presets.unet_group_matcher`."""
        return unet_group_matcher("unet.", coarse)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.pool = global_pool or "none"
            pool_cells(self.pool)
        self.num_classes = num_classes
        channels = self.block_shapes[self.block][0]
        self.num_features = pooled_dim(channels, self.pool) if self.pool != "none" else channels
        self.head_drop = nn.Dropout(self.drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The NCHW map of ``self.block`` at ``self.timestep``."""
        return self.extract(x, [self.timestep], [self.block], pool=None)[(self.timestep, self.block)]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch, as the diffusers U-Net's own gradient checkpointing (its blocks recompute their
        residual blocks in the backward). Toggle it here, not on the U-Net, so the block views follow."""
        if enable:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()
        self.grad_checkpointing = enable
        self._views.clear()
        self._view(self.block)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = pool_features(x, self.pool)
        return x if pre_logits else self.head(self.head_drop(x))

    def _intermediates(
        self, x: torch.Tensor, take: list[int], last: int | None, final: bool
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """timm's intermediate maps (see the mixin's ``forward_intermediates``), in one forward at ``self.timestep``."""
        names = [self.feature_info[i]["block"] for i in take]
        feats = self.extract(x, [self.timestep], [*names, self.block] if final else names, pool=None)
        intermediates = [feats[(self.timestep, n)] for n in names]
        return (feats[(self.timestep, self.block)] if final else None), intermediates

    # ------------------------------------------------------------------ construction helpers
    def model_args(self) -> dict:
        """Arguments that rebuild this backbone (written to timm's ``config.json`` on export)."""
        return {
            "unet_config": self.unet_config,
            "timestep": self.timestep,
            "block": self.block,
            "pool": self.pool,
            "noise_seed": self.noise_seed,
            "scheduler_config": self.scheduler_config,
        }

    def with_settings(self, **changes) -> DDAEBackbone:
        """A backbone sharing this U-Net's weights with other ``timestep``/``block``/``pool``/... settings."""
        args = {**self.model_args(), **changes}
        args.pop("unet_config")
        other = DDAEBackbone(unet=self.unet, unit_shapes=self.unit_shapes, **args)
        if "strict_inputs" in vars(self):
            other.strict_inputs = self.strict_inputs
        return other

    @classmethod
    def from_diffusers(cls, folder: str, **kwargs) -> DDAEBackbone:
        """Load a diffusers DDPM folder (``unet/`` + ``scheduler/``, e.g. the google/ddpm-cifar10-32 layout),
        strictly: a weight missing from the file is an error, not a random initialisation (see
        :func:`diffssl_plugin.weights.load_unet_folder`)."""
        unet, sched = load_unet_folder(folder)
        return cls(unet=unet, scheduler_config=sched, **kwargs)

    def export_unet(self) -> UNet2DModel:
        return copy.deepcopy(self.unet)


# ---------------------------------------------------------------------- timm registration
# timm reads ``default_cfgs`` when the ``@register_model`` functions below are decorated, so it stands above them.
from timm.models import generate_default_cfgs, register_model  # noqa: E402

_PAPER = {"first_conv": DDAEBackbone.first_conv, "paper_ids": "arXiv:2303.09769"}
default_cfgs = generate_default_cfgs(
    {
        "ddae_unet_fmnist.untrained": data_cfg(1, 28, **_PAPER, description="DDAE small CPU U-Net, 28×28 grey"),
        "ddae_unet_cifar10.untrained": data_cfg(
            3, 32, **_PAPER, description="DDAE / DDPM 35.7M CIFAR-10 U-Net (google/ddpm-cifar10-32)"
        ),
    }
)


@register_model
def ddae_unet_fmnist(pretrained: bool = False, **kwargs) -> DDAEBackbone:
    """Small DDAE U-Net for Fashion-MNIST; default readout chosen by the bench sweep (mid block, 2×2 pool)."""
    args = {"unet_config": "fmnist_small", "timestep": 10, "block": "mid", "pool": "avg2x2"}
    return create_backbone(DDAEBackbone, "ddae_unet_fmnist", pretrained, **{**args, **kwargs})


@register_model
def ddae_unet_cifar10(pretrained: bool = False, **kwargs) -> DDAEBackbone:
    """DDAE's DDPM CIFAR-10 U-Net read at DDAE's choice: ``out_6`` (our ``up1.2``) at DDAE t=11 (our 10), GAP."""
    args = {"unet_config": "cifar10_ddpm", "timestep": 10, "block": "up1.2", "pool": "avg"}
    return create_backbone(DDAEBackbone, "ddae_unet_cifar10", pretrained, **{**args, **kwargs})
