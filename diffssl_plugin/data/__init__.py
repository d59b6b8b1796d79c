"""Datasets: a registry of offline-first image sets with deterministic train/val/test splits."""

from .registry import (DATASETS, SPLITS, DatasetSpec, ImageSet, dataset_names, load_split, register_dataset,
                       stratified_pick, stratified_split)

__all__ = ["DATASETS", "SPLITS", "DatasetSpec", "ImageSet", "dataset_names", "load_split", "register_dataset",
           "stratified_pick", "stratified_split"]
