"""Datasets: a registry of offline-first image sets with deterministic train/val/test splits.

See :mod:`.registry` for the API, :mod:`.catalog` for the built-in names, and the source modules for the folder
layouts.
"""

from . import catalog  # noqa: F401 -- registers the built-in datasets
from .registry import (
    DATASETS,
    SPLITS,
    DatasetSpec,
    ImageSet,
    clear_cache,
    dataset_names,
    load_split,
    register_dataset,
    register_image_folder,
    stratified_pick,
    stratified_split,
)

__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetSpec",
    "ImageSet",
    "clear_cache",
    "dataset_names",
    "load_split",
    "register_dataset",
    "register_image_folder",
    "stratified_pick",
    "stratified_split",
]

from .scenes import (
    SEGMENTATION_SETS,
    SegmentationSet,
    compose_scenes,
    load_segmentation,
    segmentation_names,
)

__all__ += ["SEGMENTATION_SETS", "SegmentationSet", "compose_scenes", "load_segmentation", "segmentation_names"]
