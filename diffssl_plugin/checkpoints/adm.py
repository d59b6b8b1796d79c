"""guided-diffusion ADM checkpoints → diffusers ``UNet2DModel``, and diffssl's block numbers → our block names.

**Architecture** (Dhariwal & Nichol's ADM, ``guided_diffusion/unet.py``; the 256×256 unconditional model that
DifFormer/DifFeed read, papers.md §3.1): a 3×3 conv stem, per level ``num_res_blocks`` ResBlocks (+ attention at
the listed resolutions) and a down-sampling ResBlock (``resblock_updown``) except at the last level; a middle
ResBlock–attention–ResBlock; per level, top first, ``num_res_blocks + 1`` ResBlocks that each take one skip
(concatenated after the hidden state), with attention where the encoder had it, and an up-sampling ResBlock
closing every level but the last; GroupNorm(32)–SiLU–conv out (6 channels with learned σ).

* ResBlock: GN → SiLU → (avg-pool / nearest ×2 for down/up, applied to the skip path too) → conv3×3; the time
  embedding, SiLU → Linear, gives (scale, shift) with ``use_scale_shift_norm`` and
  ``GN(h)·(1 + scale) + shift`` → SiLU → dropout → conv3×3; plus the skip (1×1 conv where channels change).
* Attention: GN → 1×1 conv to q,k,v → softmax(q·k / sqrt(d)) per head → 1×1 conv, residual.
* Time: sinusoid ``[cos(t·f), sin(t·f)]`` with ``f_i = 10000^(-i/half)`` of the integer timestep (``rescale_
  timesteps=False``) → Linear(4C) → SiLU → Linear(4C).

**diffusers options that reproduce it** (checked against diffusers 0.42 source): ``resnet_time_scale_shift=
"scale_shift"`` (``ResnetBlock2D``: ``norm2(h)·(1+scale)+shift``, scale first in the chunk, like ADM);
``downsample_type/upsample_type="resnet"`` in ``AttnDownBlock2D``/``AttnUpBlock2D`` and the
``ResnetDownsampleBlock2D``/``ResnetUpsampleBlock2D`` levels without attention (a ``ResnetBlock2D(down=True)`` with
2×2 average pooling / ``up=True`` with nearest ×2, norm and SiLU before the resampling, conv after, as ADM);
``attention_head_dim=num_head_channels``; ``attn_norm_num_groups=32`` (without it ``UNetMidBlock2D`` drops the
attention GroupNorm when the time norm is not "default"); ``flip_sin_to_cos=True, freq_shift=0`` (diffusers'
exponent ``-ln(10000)·i/(half - freq_shift)`` and ``[sin, cos]`` flipped to ``[cos, sin]``);
``norm_eps=1e-5`` (``nn.GroupNorm``'s default, which ADM's ``GroupNorm32`` uses); up-block skips concatenated as
``cat([h, skip])`` in both.

**Key mapping** (ADM → diffusers; ``L`` levels, ``R = num_res_blocks``):

========================================================  ================================================
``time_embed.0`` / ``time_embed.2``                       ``time_embedding.linear_1`` / ``linear_2``
``input_blocks.0.0``                                      ``conv_in``
``input_blocks.{1 + l(R+1) + j}.0`` / ``.1``              ``down_blocks.{l}.resnets.{j}`` / ``attentions.{j}``
``input_blocks.{(l+1)(R+1)}.0`` (l < L-1)                 ``down_blocks.{l}.downsamplers.0``
``middle_block.0`` / ``.1`` / ``.2``                      ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``
``output_blocks.{i(R+1) + j}.0`` / ``.1``                 ``up_blocks.{i}.resnets.{j}`` / ``attentions.{j}``
last ResBlock of ``output_blocks.{i(R+1) + R}``           ``up_blocks.{i}.upsamplers.0`` (i < L-1)
``out.0`` / ``out.2``                                     ``conv_norm_out`` / ``conv_out``
ResBlock ``in_layers.0`` / ``in_layers.2``                ``norm1`` / ``conv1``
``emb_layers.1`` / ``out_layers.0`` / ``out_layers.3``    ``time_emb_proj`` / ``norm2`` / ``conv2``
``skip_connection``                                       ``conv_shortcut``
attention ``norm`` / ``qkv`` / ``proj_out``               ``group_norm`` / ``to_q, to_k, to_v`` / ``to_out.0``
========================================================  ================================================

``qkv`` and ``proj_out`` are 1-D convs, ``(out, in, 1)``, made ``(out, in)`` linear weights. ``qkv``'s rows are
ordered per head, ``[q_h, k_h, v_h]`` for each head h, in ``QKVAttentionLegacy`` (the released checkpoints:
``use_new_attention_order=False``), and ``[q (all heads), k, v]`` in ``QKVAttention``; both are split into
diffusers' ``to_q/to_k/to_v``, whose rows are head-major.

**diffssl's block numbers** → our names: :mod:`diffssl_plugin.checkpoints.diffssl_blocks`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from diffusers import UNet2DModel

from ..errors import CheckpointError, InputError, check_name
from ..weights import as_path, load_strict, read_state_dict
from .diffssl_blocks import resolve_block


@dataclass(frozen=True)
class ADMConfig:
    """guided-diffusion's ``create_model`` flags (``script_util.py`` names) that fix the network's shape.

    ``attention_resolutions`` are resolutions in pixels, as on guided-diffusion's command line ("32,16,8").
    """

    image_size: int = 256
    num_channels: int = 256
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_head_channels: int = 64
    num_heads: int = 4  # used only when num_head_channels == -1
    learn_sigma: bool = True
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    use_new_attention_order: bool = False
    in_channels: int = 3
    dropout: float = 0.0

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    def has_attention(self, level: int) -> bool:
        """ADM puts attention at level ``level`` when its down-sampling rate ``2**level`` is an attention rate."""
        return 2**level in {self.image_size // r for r in self.attention_resolutions}

    def heads(self, channels: int) -> int:
        return channels // self.num_head_channels if self.num_head_channels > 0 else self.num_heads


ADM_PRESETS: dict[str, ADMConfig] = {
    # OpenAI's 256x256_diffusion_uncond.pt (guided-diffusion README flags), the backbone of DifFormer/DifFeed
    "adm256_uncond": ADMConfig(),
    # the same shape (6 levels, mults 1,1,2,2,4,4, attention at down-sampling rates 8/16/32, resblock up/down,
    # scale-shift, learned σ) with 32 channels and 16 per head at 64×64, for tests and CPU smoke runs
    "adm_tiny": ADMConfig(image_size=64, num_channels=32, attention_resolutions=(8, 4, 2), num_head_channels=16),
}


def adm_config(preset: str | ADMConfig = "adm256_uncond", **overrides) -> ADMConfig:
    """A preset of :data:`ADM_PRESETS` (or an ``ADMConfig``) with any field overridden."""
    if isinstance(preset, str):
        preset = ADM_PRESETS[check_name("ADM preset", preset, ADM_PRESETS)]
    cfg = dataclasses.replace(preset, **overrides)
    return dataclasses.replace(
        cfg, channel_mult=tuple(cfg.channel_mult), attention_resolutions=tuple(cfg.attention_resolutions)
    )


def _check_supported(cfg: ADMConfig) -> None:
    if not cfg.resblock_updown:
        raise InputError(
            "only resblock_updown=True ADM models are supported (the 256×256 unconditional model "
            "and the ImageNet models use it)"
        )
    if cfg.channel_mult[0] != 1:
        raise InputError(
            f"channel_mult must start with 1 (got {cfg.channel_mult}): diffusers sizes the "
            "timestep sinusoid by the first level's channels, ADM by num_channels"
        )
    if cfg.num_head_channels <= 0 and cfg.num_heads != 1:
        raise InputError(
            "a fixed num_heads > 1 (num_head_channels=-1) cannot be expressed with diffusers' "
            "per-head width; set num_head_channels"
        )
    for level, mult in enumerate(cfg.channel_mult):
        ch = cfg.num_channels * mult
        if ch % 32:
            raise InputError(f"level {level} has {ch} channels, not a multiple of ADM's 32 GroupNorm groups")
        if (
            cfg.num_head_channels > 0
            and ch % cfg.num_head_channels
            and (cfg.has_attention(level) or level == cfg.num_levels - 1)
        ):
            raise InputError(
                f"level {level}: {ch} channels are not a multiple of {cfg.num_head_channels} channels per head"
            )


def adm_unet_config(cfg: ADMConfig) -> dict:
    """The ``UNet2DModel`` config that has ADM's architecture (see the module docstring for each option)."""
    _check_supported(cfg)
    levels = range(cfg.num_levels)
    down = ["AttnDownBlock2D" if cfg.has_attention(lv) else "ResnetDownsampleBlock2D" for lv in levels]
    up = ["AttnUpBlock2D" if cfg.has_attention(lv) else "ResnetUpsampleBlock2D" for lv in reversed(levels)]
    return {
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": tuple(cfg.num_channels * m for m in cfg.channel_mult),
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": tuple(down),
        "up_block_types": tuple(up),
        "mid_block_type": "UNetMidBlock2D",
        "add_attention": True,
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
        "attention_head_dim": cfg.num_head_channels if cfg.num_head_channels > 0 else None,
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "dropout": cfg.dropout,
    }


# ---------------------------------------------------------------------- the key mapping
def _module_plan(cfg: ADMConfig) -> list[tuple[str, str, str]]:
    """(ADM module, diffusers module, kind) for every parametrised module; kind is 'plain', 'res' or 'attn'."""
    L, R = cfg.num_levels, cfg.num_res_blocks
    plan = [
        ("time_embed.0", "time_embedding.linear_1", "plain"),
        ("time_embed.2", "time_embedding.linear_2", "plain"),
        ("input_blocks.0.0", "conv_in", "plain"),
    ]
    n = 1
    for level in range(L):
        for j in range(R):
            plan.append((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}", "res"))
            if cfg.has_attention(level):
                plan.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", "attn"))
            n += 1
        if level < L - 1:
            plan.append((f"input_blocks.{n}.0", f"down_blocks.{level}.downsamplers.0", "res"))
            n += 1
    plan += [
        ("middle_block.0", "mid_block.resnets.0", "res"),
        ("middle_block.1", "mid_block.attentions.0", "attn"),
        ("middle_block.2", "mid_block.resnets.1", "res"),
    ]
    n = 0
    for i, level in enumerate(reversed(range(L))):
        for j in range(R + 1):
            plan.append((f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", "res"))
            sub = 1
            if cfg.has_attention(level):
                plan.append((f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", "attn"))
                sub = 2
            if j == R and level > 0:
                plan.append((f"output_blocks.{n}.{sub}", f"up_blocks.{i}.upsamplers.0", "res"))
            n += 1
    plan += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return plan


_RES_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _split_qkv(weight: torch.Tensor, bias: torch.Tensor, heads: int, legacy: bool):
    """ADM's fused 1-D conv ``qkv`` (3C, C, 1) → (q, k, v) linear weights (C, C) and biases, head-major rows."""
    c = weight.shape[1]
    w, d = weight.reshape(3 * c, c), c // heads
    if legacy:  # rows: for each head, [q_h, k_h, v_h]
        w, b = w.view(heads, 3, d, c), bias.view(heads, 3, d)
        return [(w[:, i].reshape(c, c), b[:, i].reshape(c)) for i in range(3)]
    w, b = w.view(3, c, c), bias.view(3, c)  # rows: [q (all heads), k, v]
    return [(w[i], b[i]) for i in range(3)]


def convert_adm_state_dict(
    state_dict: dict[str, torch.Tensor],
    cfg: ADMConfig,
    dtype: torch.dtype | None = torch.float32,
    source: str = "ADM state dict",
) -> dict[str, torch.Tensor]:
    """An ADM ``UNetModel`` state dict → the state dict of ``UNet2DModel(**adm_unet_config(cfg))``.

    Every ADM key must be used and every module of the plan present, else :class:`CheckpointError` lists them.
    ``dtype`` casts floating tensors (the released checkpoints may be fp16-converted); ``None`` keeps them.
    """
    _check_supported(cfg)
    if any(k.startswith("label_emb.") for k in state_dict):
        raise CheckpointError(
            f"{source}: a class-conditional ADM (label_emb) is not supported; use the "
            "unconditional model (256x256_diffusion_uncond.pt)"
        )
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []

    def take(key: str) -> torch.Tensor | None:
        if key not in sd:
            missing.append(key)
            return None
        used.add(key)
        return sd[key]

    for src, dst, kind in _module_plan(cfg):
        if kind == "plain":
            for p in ("weight", "bias"):
                if (t := take(f"{src}.{p}")) is not None:
                    out[f"{dst}.{p}"] = t
        elif kind == "res":
            for part, new in _RES_PARTS.items():
                if part == "skip_connection" and f"{src}.skip_connection.weight" not in sd:
                    continue  # identity skip; load_strict reports it if diffusers expects a conv
                for p in ("weight", "bias"):
                    if (t := take(f"{src}.{part}.{p}")) is not None:
                        out[f"{dst}.{new}.{p}"] = t
        else:  # attention
            for p in ("weight", "bias"):
                if (t := take(f"{src}.norm.{p}")) is not None:
                    out[f"{dst}.group_norm.{p}"] = t
            w, b = take(f"{src}.qkv.weight"), take(f"{src}.qkv.bias")
            if w is not None and b is not None:
                heads = cfg.heads(w.shape[1])
                if w.dim() != 3 or w.shape[0] != 3 * w.shape[1] or heads < 1 or w.shape[1] % heads:
                    raise CheckpointError(
                        f"{source}: {src}.qkv.weight has shape {tuple(w.shape)}, expected "
                        f"(3C, C, 1) with C divisible by {heads} heads"
                    )
                qkv = _split_qkv(w, b, heads, legacy=not cfg.use_new_attention_order)
                for name, (wi, bi) in zip(("to_q", "to_k", "to_v"), qkv):
                    out[f"{dst}.{name}.weight"], out[f"{dst}.{name}.bias"] = wi.contiguous(), bi.contiguous()
            w, b = take(f"{src}.proj_out.weight"), take(f"{src}.proj_out.bias")
            if w is not None:
                out[f"{dst}.to_out.0.weight"] = w.reshape(w.shape[0], w.shape[1])
            if b is not None:
                out[f"{dst}.to_out.0.bias"] = b
    unused = sorted(set(sd) - used)
    if missing or unused:
        parts = [
            f"{len(x)} {what}: {x[:5]}" + (f" (+{len(x) - 5} more)" if len(x) > 5 else "")
            for what, x in (("missing ADM keys", missing), ("unmapped keys", unused))
            if x
        ]
        raise CheckpointError(f"{source} does not match the ADM config {cfg}: " + "; ".join(parts))
    return out


def adm_to_unet(state_dict: dict[str, torch.Tensor], cfg: ADMConfig, source: str = "ADM state dict") -> UNet2DModel:
    """A ``UNet2DModel`` with ADM's architecture, strictly loaded from an ADM state dict."""
    unet = UNet2DModel(**adm_unet_config(cfg))
    load_strict(unet, convert_adm_state_dict(state_dict, cfg, source=source), source)
    return unet.eval()


# ---------------------------------------------------------------------- loading
def load_adm_unet(
    path: str | os.PathLike,
    preset: str | ADMConfig = "adm256_uncond",
    wrapper_key: str | None = None,
    **config_overrides,
) -> UNet2DModel:
    """A guided-diffusion checkpoint (``.pt`` via ``weights_only`` or ``.safetensors``) as a ``UNet2DModel``."""
    cfg = adm_config(preset, **config_overrides)
    sd = read_state_dict(path, wrapper_key=wrapper_key)
    return adm_to_unet(sd, cfg, source=str(path))


def save_adm_as_diffusers(
    path: str | os.PathLike, out_dir: str | os.PathLike, preset: str | ADMConfig = "adm256_uncond", **config_overrides
) -> os.PathLike:
    """Convert once: write a diffusers DDPM folder (``unet/`` safetensors + ``scheduler/``, guided-diffusion's
    linear 1000-step schedule) that ``load_backbone_checkpoint("adm", out_dir)`` reads without converting."""
    from diffusers import DDPMScheduler

    from ..diffusion.schedule import DDPM_DEFAULTS

    out = as_path(out_dir)
    load_adm_unet(path, preset, **config_overrides).save_pretrained(out / "unet", safe_serialization=True)
    DDPMScheduler(**DDPM_DEFAULTS).save_config(out / "scheduler")
    return out


def load_adm(
    path: str | os.PathLike,
    preset: str | ADMConfig = "adm256_uncond",
    block: int | str = 24,
    timestep: int = 150,
    pool: str = "avg2x2",
    wrapper_key: str | None = None,
    adm_overrides: dict | None = None,
    device: str | torch.device | None = None,
    **kwargs,
):
    """An ADM checkpoint, or a folder written by :func:`save_adm_as_diffusers`, as a ``DDAEBackbone``.

    ``block`` is a diffssl block number (default 24) or one of our names; ``timestep`` is 0-indexed, the same in
    guided-diffusion and here (default 150, the ECCV scripts' choice); ``pool`` defaults to the linear head's 2×2
    average pool. ``device``: where the U-Net goes (``DDAEBackbone`` finds its block shapes on the ``meta``
    device, in under a second on the CPU; a real 256×256 forward took 88 s). ``adm_overrides`` change fields of
    the preset. Other ``kwargs`` go to ``DDAEBackbone``
    (``noise_seed``, ``dynamic_img_size``, …).
    """
    from ..backbones.ddae import DDAEBackbone
    from ..weights import load_unet_folder

    if as_path(path).is_dir():
        unet, sched = load_unet_folder(path)
    else:
        unet, sched = load_adm_unet(path, preset, wrapper_key=wrapper_key, **(adm_overrides or {})), {}
    if device is not None:
        unet = unet.to(device)
    name = resolve_block(block, len(unet.down_blocks), int(unet.config.layers_per_block))
    return DDAEBackbone(unet=unet, scheduler_config=sched, block=name, timestep=timestep, pool=pool, **kwargs).eval()
