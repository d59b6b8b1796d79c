"""Learners (one file each, reading like the paper) and the lightly-style method registry."""

from .base import SSLMethod, StepBatches
from .ddae import DDAE
from .registry import METHODS, get_method, load_entry_point_methods

__all__ = ["DDAE", "METHODS", "SSLMethod", "StepBatches", "get_method", "load_entry_point_methods"]
