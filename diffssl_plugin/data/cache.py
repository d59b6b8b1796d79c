"""File-backed image sets: decode once into a uint8 memory-mapped cache, reuse it every run after.

Sets stored as image files (ImageNet, Tiny-ImageNet, the fine-grained transfer sets, your own ImageFolder tree)
are decoded, resized to one fixed square size and written once as a ``.npy`` array that later runs open with
``np.load(..., mmap_mode="c")``. ``ImageSet.images`` is then a tensor view over the file: slicing is free, and
``take``/``balanced_subset`` read only the rows they pick, so ImageNet never has to fit in RAM (the OS page
cache keeps the hot part). Copy-on-write mapping: an in-place change to a loaded tensor stays private to that
process and never reaches the file. Forked DataLoader workers share the mapping; pickling such a tensor (spawned
workers) copies the whole split, so give workers the dataset name and split instead.

Layout, one folder per dataset and size (``$DIFFSSL_CACHE_DIR`` replaces ``ROOT/diffssl_cache`` if the data
root is read-only)::

    ROOT/diffssl_cache/<dataset>/<size>px/<part>.images.npy    uint8 (N, C, size, size)
                                         <part>.labels.npy    int64 (N,)
                                         <part>.indices.npy   (extra splits only) positions in trainval
                                         <part>.files.txt     the source file of every row
                                         <part>.json          written last: its presence marks a complete cache

Writing is atomic (temporary files flushed to disk, then moved into place, see
:func:`diffssl_plugin.io.atomic_path`) and guarded by a lock file, so a crash leaves no half cache and several
processes (e.g. DDP ranks) build it once; the temporary files of a killed writer are removed by the next build.
The cache is not checked against the source files on reuse: delete the folder after changing the data.

Resizing (every file-backed set): the shorter side is resized to ``size`` with Pillow's antialiased bicubic
filter and the centre ``size``×``size`` square is kept (the SimCLR/Kornblith linear-evaluation preprocessing,
and ADM's ``center_crop_arr``). JPEGs are first DCT-downscaled by Pillow's ``draft`` to no less than twice the
target size, which only speeds decoding up. Decoding runs in ``$DIFFSSL_CACHE_WORKERS`` threads (default
``min(8, cpu_count)``; Pillow releases the GIL while it decodes and resizes).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetNotFoundError
from ..io import atomic_path, write_json
from .sources import Part

FORMAT = 1
RESIZE = "shorter side to size (Pillow bicubic, antialiased), centre crop size x size"


@dataclass
class Plan:
    """What to decode into one cache part, in row order."""

    files: Sequence[str | os.PathLike]
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: Path  # the dataset folder; files.txt stores paths relative to it where possible
    val_start: int | None = None
    val_source: str = ""
    indices: np.ndarray | None = None


def cache_root(data_root: Path) -> Path:
    """``$DIFFSSL_CACHE_DIR`` if set, else ``<data root>/diffssl_cache``."""
    env = os.environ.get("DIFFSSL_CACHE_DIR")
    return Path(env).expanduser() if env else data_root / "diffssl_cache"


def cache_folder(data_root: Path, dataset: str, image_size: int) -> Path:
    return cache_root(data_root) / dataset / f"{image_size}px"


def workers() -> int:
    return int(os.environ.get("DIFFSSL_CACHE_WORKERS", "0")) or min(8, os.cpu_count() or 1)


def resize_center_crop(image, size: int):
    """Resize a PIL image so its shorter side is ``size`` (bicubic, antialiased), then crop the centre square."""
    from PIL import Image

    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def decode_image(path: str | os.PathLike, size: int, mode: str = "RGB") -> np.ndarray:
    """One image file as uint8 ``(C, size, size)`` (see :func:`resize_center_crop`)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft(mode, (2 * size, 2 * size))  # JPEG only: cheap DCT downscale, still >= 2x the target
            arr = np.asarray(resize_center_crop(im.convert(mode), size))
    except OSError as e:  # PIL.UnidentifiedImageError is an OSError
        raise DatasetNotFoundError(f"cannot decode image {path}: {e} (truncated or not an image?)") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def open_part(folder: Path, part: str, image_size: int, channels: int) -> Part | None:
    """The cached part, memory-mapped copy-on-write; None if there is no complete cache."""
    meta_path = folder / f"{part}.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(folder / f"{part}.images.npy", mmap_mode="c")
        labels = np.load(folder / f"{part}.labels.npy")
        indices_path = folder / f"{part}.indices.npy"
        indices = np.load(indices_path) if indices_path.is_file() else None
    except (OSError, ValueError) as e:
        warnings.warn(f"cache {folder}/{part} is unreadable ({e}); rebuilding it", stacklevel=3)
        return None
    if not isinstance(meta, dict):
        warnings.warn(f"cache {folder}/{part}.json is not a JSON object; rebuilding the cache", stacklevel=3)
        return None
    expected = (meta.get("count"), channels, image_size, image_size)
    torn = meta.get("labels_sha256") not in (None, _sha256(labels.astype(np.int64)))
    if meta.get("format") != FORMAT or images.shape != expected or labels.shape != (expected[0],) or torn:
        warnings.warn(
            f"cache {folder}/{part} does not match (format {meta.get('format')}, images "
            f"{images.shape}, expected {expected}); rebuilding it",
            stacklevel=3,
        )
        return None
    return Part(
        images,
        labels.astype(np.int64),
        tuple(meta["class_names"]),
        meta.get("val_start"),
        meta.get("val_source", ""),
        indices,
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (released by the OS if the process dies); a no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, atomic writes still keep the cache whole
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish writing {path.parent}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_part(
    folder: Path, part: str, image_size: int, plan: Callable[[], Plan], desc: str, channels: int = 3, mode: str = "RGB"
) -> Part:
    """Open ``part`` from the cache in ``folder``, building it first from ``plan()`` (a :class:`Plan`) if needed.

    ``plan`` is only called when the cache is missing, so a cached set never rescans its source folder.
    """
    found = open_part(folder, part, image_size, channels)
    if found is not None:
        return found
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetNotFoundError(
            f"cannot create the image cache folder {folder} ({e}); set $DIFFSSL_CACHE_DIR to a writable folder"
        ) from e
    with _locked(folder / f".{part}.lock"):
        found = open_part(folder, part, image_size, channels)  # another process may have built it meanwhile
        if found is None:
            _remove_dead_temporaries(folder, part)
            build_part(folder, part, image_size, plan(), desc, channels, mode)
            found = open_part(folder, part, image_size, channels)
    if found is None:
        raise DatasetNotFoundError(f"the cache just written to {folder} cannot be read back")
    return found


def build_part(
    folder: Path, part: str, image_size: int, plan: Plan, desc: str, channels: int = 3, mode: str = "RGB"
) -> None:
    """Decode ``plan.files`` into ``<part>.images.npy`` (in threads, with a progress bar), then the rest."""
    from tqdm.auto import tqdm

    n, start = len(plan.files), time.time()
    if len(plan.labels) != n:
        raise ValueError(f"{n} files but {len(plan.labels)} labels")
    with atomic_path(folder / f"{part}.images.npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, channels, image_size, image_size))

        def fill(rows: range) -> int:
            for r in rows:
                out[r] = decode_image(plan.files[r], image_size, mode)
            return len(rows)

        chunks = [range(i, min(i + 256, n)) for i in range(0, n, 256)]
        pool = ThreadPoolExecutor(max_workers=workers())
        try:
            with tqdm(total=n, desc=desc, unit="img", mininterval=1.0) as bar:
                for done in pool.map(fill, chunks):
                    bar.update(done)
        finally:  # on a bad file, stop at once instead of decoding the rest of ImageNet first
            pool.shutdown(wait=True, cancel_futures=True)
        out.flush()
        _fsync(tmp)
    _save_npy(folder / f"{part}.labels.npy", np.asarray(plan.labels, dtype=np.int64))
    if plan.indices is not None:
        _save_npy(folder / f"{part}.indices.npy", np.asarray(plan.indices, dtype=np.int64))
    with atomic_path(folder / f"{part}.files.txt") as tmp:
        tmp.write_text("".join(f"{_relative(f, plan.source)}\n" for f in plan.files))
    write_json(
        folder / f"{part}.json",
        {  # last: marks the cache complete
            "format": FORMAT,
            "part": part,
            "count": n,
            "image_size": image_size,
            "channels": channels,
            "class_names": list(plan.class_names),
            "val_start": plan.val_start,
            "val_source": plan.val_source,
            "labels_sha256": _sha256(np.asarray(plan.labels, dtype=np.int64)),
            "source": str(plan.source),
            "resize": RESIZE,
            "seconds": round(time.time() - start, 1),
        },
    )


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # np.save(str) would append ".npy" to the temp name
            np.save(f, array)
        _fsync(tmp)


def _fsync(path: Path) -> None:
    """Data on disk before the rename that publishes it (else a power cut can leave a zero-filled file)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sha256(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _remove_dead_temporaries(folder: Path, part: str) -> None:
    """Temporary files of ``part`` left by a writer killed mid-write (called under the part's lock, so no
    live writer owns one): never read, but an ImageNet-sized one would waste gigabytes."""
    for tmp in folder.glob(f".{part}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def _relative(path: str | os.PathLike, base: Path) -> str:
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return str(path)
