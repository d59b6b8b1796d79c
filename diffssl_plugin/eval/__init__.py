"""Evaluation harness: frozen-feature extraction and caching, probes, sweeps, records and leaderboards."""

from . import (
    finetune,  # noqa: F401
    heads_protocols,  # noqa: F401  (registers the attention, difformer and diffeed protocols)
    ood,  # noqa: F401
    segmentation,  # noqa: F401  (registers the segmentation and segmentation_mlp protocols)
    semisup,  # noqa: F401  (registers the semisup protocol)
    transfer,  # noqa: F401  (registers the transfer protocol)
)
from .features import OUTPUT, FeatureCache, Readout, extract_features, model_fingerprint, normalise
from .harness import PROTOCOLS, EvalConfig, EvalContext, evaluate, plot_sweep, register_protocol
from .leaderboard import render_markdown, write_leaderboard
from .probes import knn_accuracy, knn_probe, linear_probe
from .records import environment, make_record, read_records, write_records

__all__ = [
    "OUTPUT",
    "PROTOCOLS",
    "EvalConfig",
    "EvalContext",
    "FeatureCache",
    "Readout",
    "environment",
    "evaluate",
    "extract_features",
    "knn_accuracy",
    "knn_probe",
    "linear_probe",
    "make_record",
    "model_fingerprint",
    "normalise",
    "plot_sweep",
    "read_records",
    "register_protocol",
    "render_markdown",
    "write_leaderboard",
    "write_records",
]
