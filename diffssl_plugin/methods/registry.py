"""The method registry, in lightly's style: ``METHODS[name] = {"model": LightningModule class, "transform": …}``.

``transform`` is the learner's batch augmentation, ``transform(images_in_0_1, generator)``. It works on whole
batches (no per-image Python loop), unlike lightly's per-sample PIL transforms.

Other packages add learners without editing this file, through the entry-point group
``diffssl_plugin.methods`` (each entry point names a dict ``{"model": ..., "transform": ...}``).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from ..errors import check_name
from .ddae import DDAE
from .drl import DRL, VDRL
from .mae import MAE
from .mdsm import MDSM
from .simclr import SimCLR

ENTRY_POINT_GROUP = "diffssl_plugin.methods"

METHODS: dict[str, dict] = {
    "ddae": {"model": DDAE, "transform": DDAE.transform},
    "drl": {"model": DRL, "transform": DRL.transform},
    "vdrl": {"model": VDRL, "transform": VDRL.transform},
    "simclr": {"model": SimCLR, "transform": SimCLR.transform},
    "mae": {"model": MAE, "transform": MAE.transform},
    "mdsm": {"model": MDSM, "transform": MDSM.transform},
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
