"""DifFeed: feedback of decoder features into the encoder of a frozen diffusion U-Net (diffssl, ECCV 2024).

    x_t = √ᾱ_t x + √(1-ᾱ_t) ε                          # one ε, one t, for both passes
    pass 1 (no gradient):  d_b = U-Net(x_t, t) at decoder blocks b ∈ F
    pass 2:  U-Net(x_t, t) again, where the output of each b's mirrored encoder unit m(b) becomes
             e_m(b) + resize_bilinear(ReLU(BN(Conv1×1(d_b))))             # before it is stored as a skip
    logits = attention_head(pass-2 feature at the readout block)

Only the feedback modules and the head train. The U-Net stays frozen (its parameters never change), but
gradients flow through its pass-2 computation into the feedback modules. The passes use the backbone's
``extract`` with ``noise=`` and ``edits=`` (forward hooks on the real diffusers forward; see
:mod:`diffssl_plugin.backbones.ddae` for which tensors an edit replaces). Unlike the attention head and
DifFormer, DifFeed cannot train on cached features: pass 2 depends on the trainable feedback.

diffssl's setting: ADM decoder blocks {21, 24, 27, 30, 33, 36} fed back to their mirrors
{17, 14, 11, 8, 5, 2}: one per resolution, the decoder block that mirrors each level's first residual block,
all at t = 150, the attention head on pass-2 block 24. ``feedback_blocks="auto"`` applies the same rule to
any ``UNet2DModel``.
Choice the paper leaves open: the feedback modules keep PyTorch's default initialisation (so, as in diffssl,
pass 2 differs from pass 1 from the first step).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .attention import AttentionHead, head_preset


class FeedbackModule(nn.Sequential):
    """diffssl's ``C_B_R`` feedback: bias-free 1×1 conv (decoder → encoder channels), BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
        )


def auto_feedback_blocks(backbone) -> list[str]:
    """One feedback source per U-Net level: the decoder unit that mirrors the level's first residual block
    (diffssl's rule; with two residual blocks per level these are ADM's blocks 21, 24, …, 36)."""
    decoder = [n for n in backbone.unit_names if re.fullmatch(r"up\d+\.\d+", n)]
    targets = {backbone.mirror_block(d) for d in decoder}
    firsts = set()
    for name in backbone.unit_names:
        m = re.fullmatch(r"down(\d+)\.0", name)
        if m:  # the first residual block's skip is named by the block when it is also the block's last skip
            firsts.add(name if name in targets else f"down{m.group(1)}")
    return [d for d in decoder if backbone.mirror_block(d) in firsts]


class DifFeed(nn.Module):
    """Two-pass feedback model around a frozen diffusion backbone with ``extract(..., noise=, edits=)``.

    Args:
        backbone: a :class:`~diffssl_plugin.backbones.DDAEBackbone` (frozen here: ``requires_grad`` off,
            eval mode).
        num_classes: classifier outputs.
        timestep: the timestep of both passes (default: the backbone's).
        block: the pass-2 block the attention head reads (default: the backbone's).
        feedback_blocks: decoder units fed back to their mirrors, or ``"auto"``
            (:func:`auto_feedback_blocks`).
        head: attention-head preset name (see :data:`~.attention.HEAD_PRESETS`); ``head_kwargs`` override it.
        image_size: the (H, W) of the images when it is not the backbone's native size (map sizes follow).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        timestep: int | None = None,
        block: str | None = None,
        feedback_blocks: Sequence[str] | str = "auto",
        head: str = "cpu",
        image_size: tuple[int, int] | None = None,
        **head_kwargs,
    ):
        super().__init__()
        if not (hasattr(backbone, "extract") and hasattr(backbone, "mirror_block")):
            raise InputError(
                f"DifFeed needs a diffusion backbone with extract(edits=) and mirror_block(); "
                f"{type(backbone).__name__} has neither"
            )
        self.backbone = backbone.requires_grad_(False).eval()
        self.timestep = int(backbone.timestep if timestep is None else timestep)
        self.block = block or backbone.block
        if self.block not in backbone.block_names:
            raise InputError(f"unknown readout block {self.block!r}; valid: {', '.join(backbone.block_names)}")
        sources = auto_feedback_blocks(backbone) if feedback_blocks == "auto" else list(feedback_blocks)
        if not sources:
            raise InputError("DifFeed needs at least one feedback block")
        order = backbone.unit_names
        self.sources, self.targets = [], []
        for src in sources:
            target = backbone.mirror_block(src)
            if order.index(target) > order.index(self.block):
                raise InputError(
                    f"feedback from {src!r} goes to {target!r}, which runs after the readout "
                    f"block {self.block!r}: it could not change the head's input"
                )
            self.sources.append(src)
            self.targets.append(target)
        shapes = backbone.unit_shapes
        self.feedback = nn.ModuleList(
            FeedbackModule(shapes[s][0], shapes[t][0]) for s, t in zip(self.sources, self.targets)
        )
        in_shape = backbone.block_shapes[self.block]
        if image_size is not None and tuple(image_size) != (backbone.image_size, backbone.image_size):
            x = torch.zeros(1, backbone.in_chans, *image_size, device=next(backbone.parameters()).device)
            with torch.no_grad():
                in_shape = tuple(
                    backbone.extract(x, [self.timestep], [self.block], pool=None)[(self.timestep, self.block)].shape[1:]
                )
        self.head = AttentionHead(in_shape, num_classes, **head_preset(head, **head_kwargs))

    def train(self, mode: bool = True) -> DifFeed:
        super().train(mode)
        self.backbone.eval()  # the U-Net is frozen: no dropout, whatever the head does
        return self

    def first_pass(self, x: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pass 1 (no gradient): the feedback sources' maps."""
        with torch.no_grad():
            feats = self.backbone.extract(x, [self.timestep], self.sources, pool=None, noise=noise)
        return {s: feats[(self.timestep, s)] for s in self.sources}

    def second_pass(self, x: torch.Tensor, noise: torch.Tensor, first: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pass 2: the readout block's map with the feedback added to the mirrored encoder units."""
        edits = {}
        for module, src, target in zip(self.feedback, self.sources, self.targets):
            edits[target] = _adder(module, first[src], edits.get(target))
        feats = self.backbone.extract(x, [self.timestep], [self.block], pool=None, noise=noise, edits=edits)
        return feats[(self.timestep, self.block)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pass-2 map (B, C, H, W) of the readout block for images ``x`` in [-1, 1]."""
        noise = self.backbone.draw_noise(x, self.timestep)
        return self.second_pass(x, noise, self.first_pass(x, noise))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _adder(module: nn.Module, source: torch.Tensor, inner=None):
    """The edit ``e ↦ e + resize(module(source))`` (after ``inner`` when two sources share a target)."""

    def edit(encoder: torch.Tensor) -> torch.Tensor:
        if inner is not None:
            encoder = inner(encoder)
        fb = module(source)
        if fb.shape[-2:] != encoder.shape[-2:]:
            fb = F.interpolate(fb, size=encoder.shape[-2:], mode="bilinear", align_corners=False)
        return encoder + fb.to(encoder.dtype)

    return edit
