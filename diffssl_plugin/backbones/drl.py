"""The DRL backbone (Diffusion-Based Representation Learning, Mittal/Abstreiter et al., arXiv 2105.14257): reads
the codes of its encoder (:mod:`.drl_encoder`), honouring timm's contract.

**Encoders.** ``E_φ(x_0)`` (static code) or ``E_φ(x_0, t)`` (time-dependent, "infinite-dimensional" code)
map a clean image in [-1, 1] to a code of ``code_dim`` numbers (``code_dim=2`` for the paper's pictures).
The network is small and built from diffusers blocks: ``conv_in`` → one ``ResnetBlock2D`` per level (the
levels after the first halve the resolution) → GroupNorm → SiLU → global average pool → ``Linear``.

* Time dependence (our choice; the paper's appendix with its architecture was not available): ``t ∈ [0, 1]``
  is scaled by 1000 (the range of DDPM's integer timesteps, where the sinusoid resolves it), embedded with
  diffusers' sinusoidal ``Timesteps`` + ``TimestepEmbedding`` MLP, and enters every residual block as FiLM
  (``time_embedding_norm="scale_shift"``: GroupNorm output × (1 + scale(t)) + shift(t)).
* The variational encoder (VDRL) outputs a mean and a log-variance; its representation is the mean code.

**Backbone.** :class:`DRLBackbone` wraps an encoder: ``forward(x)`` is the code (the mean code for VDRL);
a time-dependent encoder is read at the readout times ``readout_t`` and its codes are concatenated, so
``num_features = code_dim × len(readout_t)`` (``code_dim`` for a static encoder). For the harness's
block × timestep sweep, :class:`TimeDRLBackbone` also has ``extract(x, timesteps, ["code"])`` where integer
``timestep`` k means ``t = k / 1000`` (k ∈ 0…1000); each code comes back as a (B, code_dim, 1, 1) map.

Inputs are images normalised to [-1, 1] (mean = std = 0.5), as for the diffusion backbones.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from ..diffusion.schedule import check_timesteps
from ..errors import InputError, check_name
from .drl_encoder import (
    TIMESTEP_SCALE,
    DRLEncoder,
    build_encoder,
    preset_config,  # noqa: F401  (re-exported for the DRL learner)
)
from .pooling import pool_cells, pool_features
from .timm_contract import TimmBackboneMixin, create_backbone, data_cfg
from .unet_presets import SCORE_NET_PRESETS  # noqa: F401  (re-exported: the DRL learner's score networks)


def check_readout_t(readout_t: Sequence[float]) -> tuple[float, ...]:
    """Readout times as floats in [0, 1] (at least one)."""
    try:
        ts = tuple(float(t) for t in readout_t)
    except (TypeError, ValueError):
        raise InputError(f"readout_t must be a sequence of numbers in [0, 1], got {readout_t!r}") from None
    if not ts:
        raise InputError("readout_t is empty; give at least one time t in [0, 1]")
    bad = [t for t in ts if not 0.0 <= t <= 1.0]
    if bad:
        raise InputError(f"readout times must lie in [0, 1] (the VE SDE's time), got {bad}")
    return ts


class DRLBackbone(TimmBackboneMixin, nn.Module):
    """A DRL encoder read as a feature extractor (timm contract); the features are the (mean) code.

    Args:
        encoder_config: an :data:`ENCODER_PRESETS` name or a config dict (in_chans, image_size, channels, ...).
        code_dim: code size per readout time.
        time_dependent: the encoder takes t (``E(x0, t)``); the features are its codes at ``readout_t``.
        variational: a VDRL encoder (mean and log-variance); the features are the mean code.
        readout_t: times t ∈ [0, 1] the time-dependent code is read at (concatenated); default ``(0.0,)``.
        num_classes: 0 for a feature extractor (timm convention), else a linear classifier is added.
        in_chans, img_size: timm's arguments; override the preset's channel count and image size.
        global_pool: accepted for timm (the code is already a vector; nothing to pool).
        encoder: an existing :class:`DRLEncoder` to wrap (weights shared, not copied).
    """

    first_conv = "encoder.conv_in"

    def __init__(
        self,
        encoder_config: dict | str = "fmnist",
        code_dim: int = 64,
        time_dependent: bool = False,
        variational: bool = False,
        readout_t: Sequence[float] | None = None,
        num_classes: int = 0,
        in_chans: int | None = None,
        img_size: int | None = None,
        global_pool: str | None = None,
        drop_rate: float = 0.0,
        encoder: DRLEncoder | None = None,
        **kwargs,
    ):
        super().__init__()
        kwargs.pop("pretrained_cfg", None)
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected arguments: {sorted(kwargs)}")
        if encoder is None:
            encoder, config = build_encoder(encoder_config, code_dim, time_dependent, variational, in_chans, img_size)
        else:
            config = {k: getattr(encoder, k) for k in ("in_chans", "image_size")}
            config.update(channels=list(encoder.channels), norm_num_groups=encoder.blocks[0].norm1.num_groups)
        self.encoder = encoder
        self.encoder_config = config
        if not encoder.time_dependent and readout_t is not None and len(tuple(readout_t)) > 1:
            raise InputError(
                f"readout_t={tuple(readout_t)} needs a time-dependent encoder; a static code does not depend on t"
            )
        self.readout_t = check_readout_t((0.0,) if readout_t is None else readout_t)
        self.in_chans, self.image_size = encoder.in_chans, encoder.image_size
        self.code_dim = encoder.code_dim
        self.drop_rate = drop_rate
        self.pretrained_cfg = self.data_cfg()
        self.feature_info = [
            {"num_chs": c, "reduction": r, "module": f"encoder.blocks.{i}"}
            for i, (c, r) in enumerate(zip(encoder.channels, encoder.reductions))
        ]
        self.reset_classifier(num_classes)

    @property
    def time_dependent(self) -> bool:
        return self.encoder.time_dependent

    @property
    def variational(self) -> bool:
        return self.encoder.variational

    @property
    def timm_family(self) -> str:
        """``drl_encoder``, ``drl_time_encoder`` or ``vdrl_time_encoder`` (the registered names' stems)."""
        if not self.time_dependent:
            return "drl_encoder"
        return "vdrl_time_encoder" if self.variational else "drl_time_encoder"

    # ------------------------------------------------------------------ codes
    def code(self, x: torch.Tensor, t: float | torch.Tensor | None = None) -> torch.Tensor:
        """The (mean) code ``E(x, t)``, shape (B, code_dim); ``t`` is ignored by a static encoder."""
        return self.encoder(x, t if self.time_dependent else None)[0]

    def codes(self, x: torch.Tensor, ts: Sequence[float]) -> torch.Tensor:
        """Codes at several times, concatenated: (B, code_dim × len(ts)); one batched encoder pass."""
        if not self.time_dependent:
            return self.code(x)
        ts = check_readout_t(ts)
        b = x.shape[0]
        t = torch.cat([torch.full((b,), ti, device=x.device) for ti in ts])  # fills, no copy from the host
        z = self.code(x.repeat(len(ts), 1, 1, 1), t)
        return z.view(len(ts), b, -1).transpose(0, 1).reshape(b, -1)

    # ------------------------------------------------------------------ timm contract
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch: the encoder's residual blocks recompute their activations in the backward."""
        self.grad_checkpointing = self.encoder.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer groups in forward order: stem (``conv_in``, time embedding), each residual block, then
        the output norm and code projection with the last block."""
        return {
            "stem": r"^encoder\.(?:conv_in|time_embedding)",
            "blocks": [(r"^encoder\.blocks\.(\d+)", None), (r"^encoder\.(?:norm_out|head)", (99999,))],
        }

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        n_t = len(self.readout_t) if self.time_dependent else 1
        self.num_features = self.head_hidden_size = self.code_dim * n_t
        self.head_drop = nn.Dropout(self.drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The code at the readout time(s), (B, num_features); a code has no spatial map to pool."""
        self._check(x)
        return self.codes(x, self.readout_t)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(self.head_drop(x))

    def _intermediates(
        self, x: torch.Tensor, take: list[int], last: int | None, final: bool
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """timm's intermediate maps: the encoder's block outputs at the first readout time."""
        self._check(x)
        t = self.readout_t[0] if self.time_dependent else None
        maps = self.encoder.stages(x, t)
        return (self.codes(x, self.readout_t) if final else None), [maps[i] for i in take]

    # ------------------------------------------------------------------ construction helpers
    def model_args(self) -> dict:
        """Arguments that rebuild this backbone through its registered timm name (written on export)."""
        return {
            "encoder_config": self.encoder_config,
            "code_dim": self.code_dim,
            "time_dependent": self.time_dependent,
            "variational": self.variational,
            "readout_t": list(self.readout_t),
        }


class TimeDRLBackbone(DRLBackbone):
    """A time-dependent DRL backbone, plus ``extract`` so the harness can sweep the readout time t.

    Harness blocks (each returned as a (B, D, 1, 1) map; ``pool="avg"`` gives the vector itself):

    * ``"code"`` at integer timestep k: the code ``E(x, k / 1000)`` (D = code_dim), the single-t readout;
    * ``"codes"``: the backbone's own output, the codes at ``readout_t`` concatenated (the same at every k).

    ``block`` (what the harness reads when none of its configured blocks is ours) is ``"codes"``, so the
    harness and ``forward`` agree by default.
    """

    block = "codes"
    block_names = ("code", "codes")
    #: what the harness sweeps: the concatenated codes (the output) and the code at single times t = k / 1000
    sweep_grid: ClassVar[dict] = {
        "output": True,
        "blocks": ("code",),
        "timesteps": (0, 100, 250, 500, 750, 1000),
        "pools": ("avg",),
    }
    num_train_timesteps = TIMESTEP_SCALE + 1  # k = 0 … 1000

    def extract(
        self, x: torch.Tensor, timesteps: Sequence[int], blocks: Sequence[str], pool: str | None = "avg"
    ) -> dict[tuple[int, str], torch.Tensor]:
        self._check(x)
        timesteps = check_timesteps(timesteps, self.num_train_timesteps)
        for b in blocks:
            check_name("block", b, self.block_names)
        pool = pool or "none"
        pool_cells(pool)
        vectors: dict[tuple[int, str], torch.Tensor] = {}
        if "code" in blocks:
            per_t = self.codes(x, [k / TIMESTEP_SCALE for k in timesteps]).view(x.shape[0], len(timesteps), -1)
            vectors.update({(k, "code"): per_t[:, i] for i, k in enumerate(timesteps)})
        if "codes" in blocks:
            concatenated = self.codes(x, self.readout_t)
            vectors.update({(k, "codes"): concatenated for k in timesteps})
        return {key: pool_features(v[:, :, None, None], pool) for key, v in vectors.items()}


def drl_backbone(**kwargs) -> DRLBackbone:
    """:class:`TimeDRLBackbone` for a time-dependent encoder, else :class:`DRLBackbone`."""
    encoder = kwargs.get("encoder")
    time_dependent = encoder.time_dependent if encoder is not None else kwargs.get("time_dependent", False)
    return (TimeDRLBackbone if time_dependent else DRLBackbone)(**kwargs)


def classifier_from_encoder(
    source: nn.Module | str, num_classes: int, readout_t: Sequence[float] | None = None, drop_rate: float = 0.0
) -> DRLBackbone:
    """A trainable classifier (encoder + new linear head) initialised from a trained DRL encoder, for
    fine-tuning on few labels (the paper initialises its semi-supervised classifier from the DRL encoder).

    ``source`` is a DRL/VDRL learner, a :class:`DRLBackbone`, or an exported backbone folder (``local-dir``).
    The encoder weights are copied; ``readout_t`` overrides the readout time(s) of a time-dependent encoder.
    """
    if isinstance(source, (str,)) or hasattr(source, "__fspath__"):
        import timm

        source = timm.create_model(f"local-dir:{source}", pretrained=True)
    backbone = getattr(source, "feature_backbone", getattr(source, "backbone", source))  # a learner: its EMA
    if not isinstance(backbone, DRLBackbone):
        raise InputError(
            f"classifier_from_encoder needs a DRL learner, DRL backbone or exported DRL folder, "
            f"got {type(source).__name__}"
        )
    if num_classes <= 0:
        raise InputError(f"num_classes must be positive, got {num_classes}")
    encoder = copy.deepcopy(backbone.encoder).train().requires_grad_(True)
    readout = backbone.readout_t if readout_t is None else readout_t
    clf = drl_backbone(encoder=encoder, readout_t=readout, num_classes=num_classes, drop_rate=drop_rate)
    clf.pretrained_cfg = {**backbone.pretrained_cfg, "num_classes": num_classes}
    return clf


# ---------------------------------------------------------------------- timm registration
# timm reads ``default_cfgs`` when the ``@register_model`` functions below are decorated, so it stands above them.
from timm.models import generate_default_cfgs, register_model  # noqa: E402

_PAPER = {"first_conv": DRLBackbone.first_conv, "paper_ids": "arXiv:2105.14257"}
_KINDS = {
    "drl_encoder": "DRL static encoder E(x0)",
    "drl_time_encoder": "DRL time-dependent encoder E(x0, t)",
    "vdrl_time_encoder": "VDRL stochastic time-dependent encoder (mean code)",
}
default_cfgs = generate_default_cfgs(
    {
        f"{kind}_{data}.untrained": data_cfg(c, size, **_PAPER, description=f"{text}, {size}×{size} {colour}")
        for kind, text in _KINDS.items()
        for data, c, size, colour in (("fmnist", 1, 28, "grey"), ("cifar10", 3, 32, "RGB"))
    }
)

#: readout times of the time-dependent timm models: a low, a middle and a high noise level
DEFAULT_READOUT_T = (0.0, 0.5, 1.0)


def _create(variant: str, pretrained: bool, time_dep: bool, var: bool, /, **kwargs) -> DRLBackbone:
    """A 64-d code; time-dependent ones read at :data:`DEFAULT_READOUT_T`; the encoder preset of the data.
    ``kwargs`` (an export's ``model_args``, say) override any of these."""
    args = {"encoder_config": variant.rsplit("_", 1)[1], "code_dim": 64, "time_dependent": time_dep}
    if time_dep:
        args.update(variational=var, readout_t=DEFAULT_READOUT_T)
    args.update(kwargs)
    cls = TimeDRLBackbone if args["time_dependent"] else DRLBackbone
    return create_backbone(cls, variant, pretrained, **args)


@register_model
def drl_encoder_fmnist(pretrained: bool = False, **kwargs) -> DRLBackbone:
    """DRL static encoder for 28×28 grey images, 64-d code."""
    return _create("drl_encoder_fmnist", pretrained, False, False, **kwargs)


@register_model
def drl_encoder_cifar10(pretrained: bool = False, **kwargs) -> DRLBackbone:
    """DRL static encoder for 32×32 RGB images, 64-d code."""
    return _create("drl_encoder_cifar10", pretrained, False, False, **kwargs)


@register_model
def drl_time_encoder_fmnist(pretrained: bool = False, **kwargs) -> DRLBackbone:
    """DRL time-dependent encoder, 64-d code read at t = 0, 0.5, 1 and concatenated (192 features)."""
    return _create("drl_time_encoder_fmnist", pretrained, True, False, **kwargs)


@register_model
def drl_time_encoder_cifar10(pretrained: bool = False, **kwargs) -> DRLBackbone:
    """DRL time-dependent encoder for 32×32 RGB images, codes at t = 0, 0.5, 1 (192 features)."""
    return _create("drl_time_encoder_cifar10", pretrained, True, False, **kwargs)


@register_model
def vdrl_time_encoder_fmnist(pretrained: bool = False, **kwargs) -> DRLBackbone:
    """VDRL time-dependent encoder; the features are the mean codes at t = 0, 0.5, 1."""
    return _create("vdrl_time_encoder_fmnist", pretrained, True, True, **kwargs)


@register_model
def vdrl_time_encoder_cifar10(pretrained: bool = False, **kwargs) -> DRLBackbone:
    """VDRL time-dependent encoder for 32×32 RGB images; mean codes at t = 0, 0.5, 1."""
    return _create("vdrl_time_encoder_cifar10", pretrained, True, True, **kwargs)
