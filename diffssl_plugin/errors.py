"""Exceptions that name the problem. Every user-facing failure in the package raises one of these."""

from __future__ import annotations

from collections.abc import Iterable


class DiffSSLError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(DiffSSLError, ValueError):
    """An input tensor has the wrong shape, channel count, value range or contains NaN/inf."""


class UnknownNameError(DiffSSLError, KeyError):
    """A method, dataset, block or protocol name that is not registered. The message lists the valid ones."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(self.valid) or '(none)'}")

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return self.args[0]


class DatasetNotFoundError(DiffSSLError, FileNotFoundError):
    """A dataset is neither installed, under the given root, nor downloadable. The message says how to get it."""


class CheckpointError(DiffSSLError, RuntimeError):
    """A checkpoint is missing, truncated, corrupted, or would need untrusted code (pickle) to load."""


def check_name(kind: str, name: str, valid: Iterable[str]) -> str:
    """Return ``name`` if it is in ``valid``, else raise :class:`UnknownNameError` listing the valid names."""
    valid = list(valid)
    if name not in valid:
        raise UnknownNameError(kind, name, valid)
    return name
