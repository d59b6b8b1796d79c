"""Evaluation harness: frozen-feature extraction and caching, probes, sweeps, records and leaderboards."""

from .features import OUTPUT, FeatureCache, Readout, extract_features, model_fingerprint, normalise
from .harness import PROTOCOLS, EvalConfig, EvalContext, evaluate, plot_sweep, register_protocol
from .leaderboard import render_markdown, write_leaderboard
from .probes import knn_accuracy, knn_probe, linear_probe
from .records import environment, make_record, read_records, write_records
from . import finetune  # noqa: F401
from . import ood  # noqa: F401
from . import heads_protocols  # noqa: F401  (registers the attention, difformer and diffeed protocols)
from . import segmentation  # noqa: F401  (registers the segmentation and segmentation_mlp protocols)
from . import semisup  # noqa: F401  (registers the semisup protocol)
from . import transfer  # noqa: F401  (registers the transfer protocol)

__all__ = ["OUTPUT", "FeatureCache", "Readout", "extract_features", "model_fingerprint", "normalise",
           "EvalConfig", "EvalContext", "PROTOCOLS", "register_protocol", "evaluate", "plot_sweep", "render_markdown", "write_leaderboard", "knn_accuracy",
           "knn_probe", "linear_probe", "environment", "make_record", "read_records", "write_records"]
