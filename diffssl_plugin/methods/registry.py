"""The method registry, in lightly's style: ``METHODS[name] = {"model": LightningModule class, "transform": …}``.

``transform`` is the learner's batch augmentation, ``transform(images_in_0_1, generator)``. It works on whole
batches (no per-image Python loop), unlike lightly's per-sample PIL transforms; it is what our step-indexed,
exactly resumable path uses. ``image_transform`` is the same augmentation per image (a PIL image or tensor in,
the view or list of views out), usable as a ``LightlyDataset`` transform, and ``val_transform`` the
deterministic per-image input of the backbone (for validation/kNN loaders in lightly's format).

Other packages add learners without editing this file, through the entry-point group
``diffssl_plugin.methods`` (each entry point names a dict ``{"model": ..., "transform": ...}``).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from ..errors import check_name
from .ddae import DDAE
from .drl import DRL, VDRL
from .lightly_api import PerImageTransform
from .mae import MAE
from .mdsm import MDSM
from .simclr import SimCLR

ENTRY_POINT_GROUP = "diffssl_plugin.methods"


def _entry(model: type) -> dict:
    return {
        "model": model,
        "transform": model.transform,
        "image_transform": PerImageTransform(model.transform),
        "val_transform": PerImageTransform(model.eval_transform, random=False),
    }


METHODS: dict[str, dict] = {
    "ddae": _entry(DDAE),
    "drl": _entry(DRL),
    "vdrl": _entry(VDRL),
    "simclr": _entry(SimCLR),
    "mae": _entry(MAE),
    "mdsm": _entry(MDSM),
}


def load_entry_point_methods() -> list[str]:
    """Add the methods other installed packages declare in the ``diffssl_plugin.methods`` group."""
    added = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in METHODS:
            entry = ep.load()
            if not (isinstance(entry, dict) and "model" in entry):
                raise TypeError(f"entry point {ep.name!r} must name a dict with a 'model' key, got {entry!r}")
            METHODS[ep.name] = {"transform": getattr(entry["model"], "transform", None), **entry}
            added.append(ep.name)
    return added


def get_method(name: str) -> dict:
    """The registry entry of ``name``; unknown names raise an error listing the valid ones."""
    if name not in METHODS:
        load_entry_point_methods()
    return METHODS[check_name("method", name, METHODS)]
