"""Exceptions that name the problem. Every user-facing failure in the package raises one of these.

The ``diffssl`` command maps them to exit codes (:func:`exit_code`): 2 for a usage error (a bad argument, name,
value or config file: :class:`UsageError` and its kin :class:`InputError` and :class:`UnknownNameError`), 1 for a
runtime failure (a damaged checkpoint, a missing dataset, an unreadable file), 0 for success."""

from __future__ import annotations

from collections.abc import Iterable


class DiffSSLError(Exception):
    """Base class of every error this package raises on purpose."""


class UsageError(DiffSSLError, ValueError):
    """A command-line argument, option value or config file that cannot be used as given (exit code 2)."""


class InputError(UsageError):
    """An input tensor has the wrong shape, channel count, value range or contains NaN/inf."""


class UnknownNameError(UsageError, KeyError):
    """A method, dataset, block or protocol name that is not registered. The message lists the valid ones."""

    #: longer lists of valid names are cut to the closest matches (timm has over a thousand models)
    MAX_LISTED = 40

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        if len(self.valid) <= self.MAX_LISTED:
            listed = f"valid {kind}s: {', '.join(self.valid) or '(none)'}"
        else:
            import difflib

            close = difflib.get_close_matches(str(name), self.valid, n=8, cutoff=0.5)
            listed = f"{len(self.valid)} valid {kind}s; closest: {', '.join(close) or '(none close)'}"
        super().__init__(f"unknown {kind} {name!r}; {listed}")

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return self.args[0]


class DatasetNotFoundError(DiffSSLError, FileNotFoundError):
    """A dataset is neither installed, under the given root, nor downloadable. The message says how to get it."""


class CheckpointError(DiffSSLError, RuntimeError):
    """A checkpoint is missing, truncated, corrupted, or would need untrusted code (pickle) to load."""


class FileFormatError(DiffSSLError, OSError):
    """A file the package reads (records, configs, caches) is missing, unreadable or not in its format; the
    message names the file and the problem."""


class MissingFileError(FileFormatError, FileNotFoundError):
    """A file the package reads is not there; the message says how to make it."""


def exit_code(error: BaseException) -> int:
    """The ``diffssl`` exit code of an expected failure: 2 for usage errors, 1 for runtime failures."""
    return 2 if isinstance(error, UsageError) else 1


def check_name(kind: str, name: str, valid: Iterable[str]) -> str:
    """Return ``name`` if it is in ``valid``, else raise :class:`UnknownNameError` listing the valid names."""
    valid = list(valid)
    if name not in valid:
        raise UnknownNameError(kind, name, valid)
    return name
