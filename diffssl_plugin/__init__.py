"""diffssl-plugin: diffusion-based self-supervised learners for the lightly / timm / diffusers / Lightning
ecosystem, and one harness that benchmarks them against SimCLR and MAE.

``import diffssl_plugin`` registers the backbones with timm (``timm.create_model("ddae_unet_fmnist")``).
"""

__version__ = "0.1.0"

from . import backbones  # noqa: F401  (timm registration side effect)
