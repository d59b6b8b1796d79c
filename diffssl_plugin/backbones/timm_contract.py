"""The part of timm's backbone contract that every diffssl backbone implements the same way, and the one way
they are registered with timm.

Each backbone defines ``forward_features``, ``forward_head``, ``reset_classifier``, ``feature_info`` and the
:meth:`~TimmBackboneMixin._intermediates` hook (and ``group_matcher`` where its layers have a depth order); this
mixin adds ``get_classifier``, ``forward``, ``prune_intermediate_layers``, ``forward_intermediates`` (timm's
signature and index/format check, then the hook), ``set_grad_checkpointing`` (a flag the backbone's block
loop reads), ``no_weight_decay``, the backbone's own ``pretrained_cfg`` (:meth:`~TimmBackboneMixin.data_cfg`),
the registered name of the shape it was built for (:attr:`~TimmBackboneMixin.architecture`) and the input
checks (:meth:`~TimmBackboneMixin.check_inputs`: metadata in every forward, values once per dataset, see
:mod:`.checks`). Put it before ``nn.Module`` in the bases.

**Registration**, the same in every model file: a ``default_cfgs`` table of :func:`data_cfg` entries, then
three-line ``@register_model`` functions at the bottom of the file that call :func:`create_backbone`. Model
names are ``{family}_{dataset}`` (``ddae_unet_cifar10``); :func:`architecture_for` picks the one whose input
size a trained backbone has, which is the name its export records.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from .checks import STRICT_INPUTS, check_images, check_values


class TimmBackboneMixin:
    """Shared timm contract methods (see the module docstring)."""

    head: nn.Module
    feature_info: list[dict]
    in_chans: int
    image_size: int
    #: the range of the normalised images the backbone reads (``check_inputs`` checks it); None: any finite value
    input_range: tuple[float, float] | None = (-1.0, 1.0)
    #: also run the value checks (NaN/inf, range: host syncs) in every forward; default DIFFSSL_STRICT_INPUTS
    strict_inputs: bool = STRICT_INPUTS
    grad_checkpointing: bool = False
    #: registered names are ``f"{timm_family}_{dataset}"`` (see :func:`architecture_for`)
    timm_family: str = ""
    #: ``pretrained_cfg["first_conv"]``: the module that reads the image (timm adapts it to other channel counts)
    first_conv: str = ""

    def data_cfg(self) -> dict:
        """This backbone's timm ``pretrained_cfg``: its channels and size, and the normalisation that maps
        [0, 1] images onto :attr:`input_range`."""
        return data_cfg(self.in_chans, self.image_size, self.input_range or (0.0, 1.0), first_conv=self.first_conv)

    @property
    def architecture(self) -> str:
        """The registered timm name of this backbone's family and input shape (what an export records)."""
        return architecture_for(self.timm_family, self.in_chans, self.image_size)

    def no_weight_decay(self) -> set[str]:
        """timm's optimiser factory already exempts biases and 1-D parameters (norms); our backbones have no
        embedding table or token that should also be exempt, so the set is empty."""
        return set()

    def check_inputs(self, x: torch.Tensor, values: bool = True) -> None:
        """Raise :class:`InputError` naming the problem if ``x`` is not a batch this backbone reads: type, shape,
        channels, size and dtype, and with ``values`` NaN/inf and :attr:`input_range`. The value checks copy to
        the host, so run them once per dataset (say on its first batch); forwards check the metadata only,
        unless :attr:`strict_inputs` is set."""
        name = type(self).__name__
        check_images(x, self.in_chans, None if getattr(self, "dynamic_img_size", False) else self.image_size, name=name)
        if values:
            check_values(x, self.input_range, name=name)

    def _check(self, x: torch.Tensor) -> None:
        """The check every forward starts with: metadata, plus the values when :attr:`strict_inputs`."""
        self.check_inputs(x, values=self.strict_inputs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch for activation checkpointing: blocks recompute their activations in the backward."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _take_indices(self, indices: int | list[int] | None, output_fmt: str = "NCHW") -> tuple[list[int], int]:
        """timm's ``feature_take_indices`` over :attr:`feature_info`; only NCHW maps are produced."""
        from timm.models._features import feature_take_indices

        if output_fmt != "NCHW":
            raise InputError(f"output_fmt {output_fmt!r} is not supported; {type(self).__name__} gives NCHW maps")
        return feature_take_indices(len(self.feature_info), indices)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's intermediate-feature API over :attr:`feature_info`: check ``indices`` and ``output_fmt``, then
        read the maps through the backbone's :meth:`_intermediates` (``norm`` is timm's; no backbone norms them)."""
        take, max_index = self._take_indices(indices, output_fmt)
        last = max_index if intermediates_only or stop_early else None
        final, intermediates = self._intermediates(x, take, last, final=not intermediates_only)
        return intermediates if intermediates_only else (final, intermediates)

    def _intermediates(
        self, x: torch.Tensor, take: list[int], last: int | None, final: bool
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The per-backbone part of :meth:`forward_intermediates`: the output (when ``final``; else None may
        stand in) and the maps of the ``take`` entries of :attr:`feature_info`; ``last`` is the highest index
        needed when the forward may stop early, else None."""
        raise NotImplementedError(f"{type(self).__name__} does not define _intermediates")

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Keep the weights (the forward already stops after the last map requested); drop the head."""
        take, _ = self._take_indices(indices)
        if prune_head:
            self.reset_classifier(0, "")
        return take


# ---------------------------------------------------------------------- registration helpers
def data_cfg(in_chans: int, image_size: int, input_range: tuple[float, float] = (-1.0, 1.0), **fields) -> dict:
    """The timm ``pretrained_cfg`` fields the harness reads: input size, and ``mean``/``std`` that map [0, 1]
    images onto ``input_range`` ((-1, 1): 0.5 and 0.5; (0, 1): 0 and 1). ``fields`` add or override any field
    (``first_conv``, ``paper_ids``, ``description``, ImageNet ``mean``/``std``, ...)."""
    low, high = input_range
    return {
        "input_size": (in_chans, image_size, image_size),
        "mean": (-low / (high - low) + 0.0,) * in_chans,  # + 0.0: 0.0, not -0.0
        "std": (1.0 / (high - low),) * in_chans,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "num_classes": 0,
        "classifier": "head",
        **fields,
    }


def create_backbone(
    cls: type, variant: str, pretrained: bool = False, feature_indices: int | tuple[int, ...] | None = None, **kwargs
) -> nn.Module:
    """timm's builder for every registered model: ``build_model_with_cfg``, then a ``pretrained_cfg`` that
    describes the model built (a registered cfg fixes one channel count and size; ``in_chans=``, ``img_size=``
    or a config may change them: ``cls.data_cfg()`` says). ``features_only=True`` wraps it in timm's getter
    feature net over ``out_indices`` (default ``feature_indices``, or every entry of ``feature_info``)."""
    from timm.models import build_model_with_cfg
    from timm.models._builder import pretrained_cfg_for_features
    from timm.models._features import FeatureGetterNet

    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", feature_indices)
    kwargs.pop("feature_cls", None)
    model = build_model_with_cfg(cls, variant, pretrained, **kwargs)
    model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **model.data_cfg()}
    if not features_only:
        return model
    take = tuple(range(len(model.feature_info))) if out_indices is None else out_indices
    features = FeatureGetterNet(model, out_indices=take)
    features.pretrained_cfg = features.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    return features


def registered_models() -> list[str]:
    """Every timm model name this package registers (sorted)."""
    import timm
    from timm.models import model_entrypoint

    return [n for n in timm.list_models() if model_entrypoint(n).__module__.startswith(__package__ + ".")]


def architecture_for(family: str, in_chans: int, image_size: int) -> str:
    """The registered ``{family}_{dataset}`` name for images of ``in_chans`` × ``image_size``²: the one whose
    default input size is that shape, else one with that channel count, else the first. The exported
    ``model_args`` carry the whole configuration, so any of them rebuilds the network; the name says which
    preset (which data shape) it was trained as."""
    import timm
    from timm.models import get_pretrained_cfg

    if family and timm.is_model(family):  # one name for every shape (raw_pixels)
        return family
    names = [n for n in timm.list_models(f"{family}_*") if "_" not in n[len(family) + 1 :]]
    if not family or not names:
        raise InputError(f"no timm model is registered for the backbone family {family!r}")

    def fit(name: str) -> int:
        c, h, _ = get_pretrained_cfg(name).input_size
        return (c == in_chans) + (c == in_chans and h == image_size)

    return max(names, key=fit)
