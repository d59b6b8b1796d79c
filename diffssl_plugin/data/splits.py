"""Seeded, class-stratified index splits shared by every dataset (in memory or file-backed)."""

from __future__ import annotations

import numpy as np
import torch


def stratified_pick(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Sorted positions of up to ``per_class`` items of each class, chosen by a seeded permutation."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    picked = [order[labels[order] == c][:per_class] for c in torch.unique(labels)]
    return torch.cat(picked).sort().values


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into (rest, held-out) with ``fraction`` of every class held out, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        held.append(members[: round(fraction * len(members))])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), held_out)
    return rest, held_out


def train_then_val(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, int]:
    """A row order that puts the seeded stratified validation split last: ``(order, val_start)``.

    File-backed caches store their training rows in this order so that ``train`` (rows ``[:val_start]``) and
    ``val`` (rows ``[val_start:]``) are both plain slices (views) of one memory-mapped array. Within each part
    the source order is kept, so the rows are exactly ``stratified_split(labels, fraction, seed)``.
    """
    rest, held = stratified_split(np.asarray(labels), fraction, seed)
    return np.concatenate([rest, held]).astype(np.int64), len(rest)
