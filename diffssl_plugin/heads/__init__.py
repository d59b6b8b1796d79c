"""Heads on frozen diffusion features (diffssl, ECCV 2024): attention pooling, DifFormer fusion, DifFeed
feedback, and the head-training protocol (the only place labels are used)."""

from .attention import HEAD_PRESETS, AttentionHead, CLSTransformer, PreLayer, head_preset
from .diffeed import DifFeed, FeedbackModule, auto_feedback_blocks
from .difformer import DifFormer
from .training import (
    TRAINING_PRESETS,
    HeadTraining,
    Rows,
    TrainResult,
    accuracy,
    dict_rows,
    image_rows,
    predict,
    tensor_rows,
    train_head,
    training_preset,
)

__all__ = [
    "HEAD_PRESETS",
    "TRAINING_PRESETS",
    "AttentionHead",
    "CLSTransformer",
    "DifFeed",
    "DifFormer",
    "FeedbackModule",
    "HeadTraining",
    "PreLayer",
    "Rows",
    "TrainResult",
    "accuracy",
    "auto_feedback_blocks",
    "dict_rows",
    "head_preset",
    "image_rows",
    "predict",
    "tensor_rows",
    "train_head",
    "training_preset",
]
