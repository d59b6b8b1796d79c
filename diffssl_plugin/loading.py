"""Backbones in and out: load one from any source, export a trained learner's.

* :func:`load_backbone`: an export folder (written by ``diffssl pretrain`` or ``diffssl export``), or a timm
  model name with an optional weights file.
* :func:`load_checkpoint_backbone`: an export folder or a published checkpoint (``diffusers_ddpm``, ``adm``,
  ``mdsm``: :func:`diffssl_plugin.checkpoints.load_backbone_checkpoint`), with readout settings applied.
* :func:`load_learner_checkpoint`: a Lightning ``.ckpt`` written by ``diffssl pretrain``, as its learner.
* :func:`export`: a learner's backbone as safetensors + timm ``config.json`` (``backbone/``), its generative
  U-Net as a diffusers pipeline (``diffusers/``) and the pretraining record (``pretrain.json``), which
  :func:`read_pretrain_info` reads back.

Files are read only as safetensors or with ``torch.load(weights_only=True)``: a pickle that needs code to load
is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .backbones.memory_format import contiguous_weights
from .errors import CheckpointError, UnknownNameError
from .io import load_weights, write_json


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


# ---------------------------------------------------------------------------------------------- loading
def load_backbone(checkpoint: str | None = None, model: str | None = None, weights: str | None = None):
    """A backbone from an export folder, or a timm name with an optional weights file."""
    import timm

    if checkpoint:
        folder = Path(checkpoint)
        folder = folder / "backbone" if (folder / "backbone").is_dir() else folder
        if not (folder / "config.json").is_file():
            raise CheckpointError(
                f"{folder} is not an exported backbone folder (no config.json); "
                "run `diffssl export` on a training checkpoint first"
            )
        try:
            return timm.create_model(f"local-dir:{folder}", pretrained=True)
        except Exception as e:  # timm, safetensors and json raise many types for a damaged folder
            raise CheckpointError(
                f"cannot load the backbone in {folder} (truncated or corrupted?): {type(e).__name__}: {_first_line(e)}"
            ) from e
    if not model:
        raise UnknownNameError("timm model", str(model), timm.list_models())
    if not timm.is_model(model):
        raise UnknownNameError("timm model", model, timm.list_models())
    try:
        net = timm.create_model(model, num_classes=0)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot build timm model {model!r}: {_first_line(e)}") from e
    if weights:
        state = load_weights(weights)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{weights} does not fit {model}: {_first_line(e)}") from e
    return net


def is_export(folder: str | os.PathLike) -> bool:
    """A `diffssl pretrain` export (timm ``config.json`` naming an ``architecture``), not a diffusers folder."""
    folder = Path(folder)
    config = folder / "backbone" / "config.json" if (folder / "backbone").is_dir() else folder / "config.json"
    try:
        return config.is_file() and "architecture" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def load_checkpoint_backbone(
    path: str | os.PathLike,
    kind: str | None = None,
    device: str = "cpu",
    default_kind: str | None = None,
    settings: dict | None = None,
):
    """A backbone from ``path``: our export folder (``kind="export"``) or a published checkpoint through
    :func:`diffssl_plugin.checkpoints.load_backbone_checkpoint`.

    Without ``kind``, an export folder is recognised as one; anything else is read as ``default_kind`` (a
    reproduction config's checkpoint kind), else as an export. ``settings`` (``block``, ``timestep``, ...)
    are applied to backbones that take them (``with_settings``)."""
    if kind is None and is_export(path):
        kind = "export"  # a `diffssl pretrain` export folder (timm config.json + safetensors)
    kind = kind or default_kind or "export"
    if kind == "export":
        backbone = load_backbone(checkpoint=str(path))
    else:
        from .checkpoints import load_backbone_checkpoint

        # ADM's loader probes block shapes with one forward: on the GPU when there is one (minutes on a CPU)
        kwargs = {"device": device} if kind == "adm" else {}
        backbone = load_backbone_checkpoint(kind, path, **kwargs)
    if settings and hasattr(backbone, "with_settings"):
        backbone = backbone.with_settings(**settings)
    return backbone


def load_learner_checkpoint(model_cls, path: str | os.PathLike, method: str):
    """The learner ``model_cls`` (registered as ``method``) from a Lightning ``.ckpt`` written by ``diffssl
    pretrain``, on the CPU; a pickle that needs code to load is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return model_cls.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch/Lightning raise many types for damaged or untrusted files
        if "weights only load failed" in str(e).lower():
            raise CheckpointError(
                f"refusing to load {path}: it is a pickle that needs code to load "
                "(untrusted checkpoints are never unpickled)"
            ) from e
        raise CheckpointError(
            f"cannot load {path} as a {method} checkpoint (truncated or corrupted?): {_first_line(e)}"
        ) from e


def read_pretrain_info(export_dir: str | os.PathLike) -> dict | None:
    """The pretraining record (``pretrain.json``) :func:`export` wrote, or None when the export has none
    (``diffssl export`` of a bare checkpoint). ``export_dir`` may also be the export's ``backbone/``."""
    folder = Path(export_dir)
    if (folder / "config.json").is_file() and folder.name == "backbone":
        folder = folder.parent
    path = folder / "pretrain.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated?): {e}") from e
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(info).__name__}")
    return info


# ---------------------------------------------------------------------------------------------- export
def export(model, folder: str | os.PathLike, result=None) -> Path:
    """Write ``backbone/`` (safetensors + timm ``config.json``, loadable with ``timm.create_model('local-dir:…')``)
    and, for generative learners, ``diffusers/`` (a ``DDPMPipeline`` folder), atomically as a whole.

    ``model`` is a trained learner (:class:`~diffssl_plugin.methods.base.SSLMethod`); ``result`` (its
    :class:`~diffssl_plugin.methods.training.PretrainResult`), when given, is written as ``pretrain.json``."""
    from timm.models._hub import save_for_hf

    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    backbone = getattr(model, "feature_backbone", model.backbone)  # the representation (EMA where kept)
    # the registered name of the shape trained (``ddae_unet_cifar10`` for CIFAR-10-shaped data); timm's own
    # baselines (no ``architecture``) are named by the learner
    architecture = getattr(backbone, "architecture", None) or model.timm_architecture
    backbone.pretrained_cfg = {**backbone.pretrained_cfg, "architecture": architecture}
    # safetensors stores contiguous tensors only: channels-last weights (memory_format.py) are written as NCHW
    with contiguous_weights(backbone):
        save_for_hf(backbone, str(staging / "backbone"), model_args=backbone.model_args(), safe_serialization=True)
    unet = getattr(model, "generative_unet", None)
    if unet is not None:
        from diffusers import DDPMPipeline

        DDPMPipeline(unet=unet, scheduler=model.scheduler).save_pretrained(str(staging / "diffusers"))
    if result is not None:
        write_json(staging / "pretrain.json", result.as_record())
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder
