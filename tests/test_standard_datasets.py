"""Standard datasets from a data root, on tiny fake copies written in each set's own on-disk format.

No network: every load passes ``download=False``, and torchvision's MD5 checks (which only the official files
pass) are replaced by an existence check. The CIFAR fakes are pickles because that is CIFAR's own format.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffssl_plugin.data import (
    DATASETS,
    ImageSet,
    load_split,
    register_image_folder,
    registry,
    sources,
    stratified_split,
)
from diffssl_plugin.data import cache as cache_mod
from diffssl_plugin.errors import DatasetNotFoundError, InputError, UnknownNameError

NEW_SETS = [
    "cifar10",
    "cifar100",
    "stl10",
    "tiny_imagenet",
    "imagenet",
    "flowers102",
    "oxford_pets",
    "fgvc_aircraft",
    "stanford_cars",
    "dtd",
    "food101",
]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """An empty default data root, no cache override, two decode threads, and no MD5 checks."""
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.flowers102 as tv_flowers
    import torchvision.datasets.stl10 as tv_stl

    empty = tmp_path / "default_root"
    empty.mkdir()
    monkeypatch.setenv("DIFFSSL_DATA_ROOT", str(empty))
    monkeypatch.delenv("DIFFSSL_CACHE_DIR", raising=False)
    monkeypatch.setenv("DIFFSSL_CACHE_WORKERS", "2")
    for mod in (tv_cifar, tv_stl, tv_flowers):
        monkeypatch.setattr(mod, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    registry.clear_cache()
    yield
    registry.clear_cache()


def load(name, split, root, **kw):
    kw.setdefault("download", False)
    return load_split(name, split, root=root, **kw)


# ---------------------------------------------------------------- writers of fake datasets


def colour(label: int, k: int) -> tuple[int, int, int]:
    """A flat colour that encodes (label, item) and survives JPEG to within a few levels."""
    return (30 + 50 * label, 10 + 12 * k, 200)


def decode_colour(image: torch.Tensor) -> tuple[int, int]:
    r, g, _ = image.float().mean(dim=(1, 2)).tolist()
    return round((r - 30) / 50), round((g - 10) / 12)


def write_image(path: Path, rgb, size=(20, 16), fmt="JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(rgb)).save(path, format=fmt, quality=95)


def write_cifar10(root: Path, per_batch=20, n_test=20):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, train_y = [], []
    for b in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [(j + b) % 10 for j in range(per_batch)]
        with open(base / f"data_batch_{b}", "wb") as f:
            pickle.dump({"batch_label": f"batch {b}", "labels": y, "data": x, "filenames": []}, f)
        train_x.append(x)
        train_y += y
    test_x = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_y = [j % 10 for j in range(n_test)]
    with open(base / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "test", "labels": test_y, "data": test_x, "filenames": []}, f)
    names = [f"class{i}" for i in range(10)]
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return (
        np.concatenate(train_x).reshape(-1, 3, 32, 32),
        np.array(train_y),
        test_x.reshape(-1, 3, 32, 32),
        np.array(test_y),
        names,
    )


def write_stl10(root: Path, n_train=60, n_test=10, n_unlabeled=4):
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        x = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        (base / f"{split}_X.bin").write_bytes(x.transpose(0, 1, 3, 2).tobytes())  # STL stores columns first
        y = np.arange(n) % 10
        if split != "unlabeled":
            (base / f"{split}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())  # 1-based on disk
        out[split] = (x, y)
    (base / "class_names.txt").write_text("\n".join(f"stl{i}" for i in range(10)) + "\n")
    return out


WNIDS = ("n01443537", "n01629819", "n01641577")


def write_tiny(base: Path, per_class=10, val_per_class=2):
    (base / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for c, wnid in enumerate(WNIDS):
        for k in range(per_class):
            write_image(base / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", colour(c, k), size=(64, 64))
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
    lines = []
    for j in range(val_per_class * len(WNIDS)):
        c = j % len(WNIDS)
        write_image(base / "val" / "images" / f"val_{j}.JPEG", colour(c, j), size=(64, 64))
        lines.append(f"val_{j}.JPEG\t{WNIDS[c]}\t0\t0\t10\t10")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    write_image(base / "test" / "images" / "test_0.JPEG", (0, 0, 0), size=(64, 64))


def write_imagenet(base: Path, per_class=60, val_per_class=4):
    for c, wnid in enumerate(WNIDS):
        for k in range(per_class):
            write_image(base / "train" / wnid / f"{wnid}_{k}.JPEG", colour(c, k % 20), size=(24, 16), fmt="PNG")
        for k in range(val_per_class):
            write_image(base / "val" / wnid / f"ILSVRC2012_val_{c}{k:04d}.JPEG", colour(c, k), size=(16, 24), fmt="PNG")
    one = [f"{wnid}_{k}.JPEG" for wnid in WNIDS for k in (3, 7)]
    ten = [f"{wnid}_{k}.JPEG" for wnid in WNIDS for k in range(0, 60, 10)]
    (base / "1percent.txt").write_text("\n".join(one) + "\n")
    (base / "10percent.txt").write_text("\n".join(ten) + "\n")
    return one, ten


# ---------------------------------------------------------------- CIFAR / STL (in memory)


def test_cifar10_from_root_matches_the_files(tmp_path):
    x, y, tx, ty, names = write_cifar10(tmp_path)
    tv, te = load("cifar10", "trainval", tmp_path), load("cifar10", "test", tmp_path)
    assert tv.images.shape == (100, 3, 32, 32) and tv.images.dtype == torch.uint8
    assert np.array_equal(tv.images.numpy(), x) and np.array_equal(tv.labels.numpy(), y)
    assert np.array_equal(te.images.numpy(), tx) and np.array_equal(te.labels.numpy(), ty)
    assert tv.class_names == tuple(names) and tv.num_classes == DATASETS["cifar10"].num_classes == 10
    assert torch.equal(tv.indices, torch.arange(100))


def test_cifar10_val_split_is_stratified_seeded_and_partitions_trainval(tmp_path):
    write_cifar10(tmp_path)
    tv = load("cifar10", "trainval", tmp_path)
    train, val = load("cifar10", "train", tmp_path), load("cifar10", "val", tmp_path)
    assert Counter(val.labels.tolist()) == dict.fromkeys(range(10), 1)  # 10% of 10 per class
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert set(train.indices.tolist()) | set(val.indices.tolist()) == set(range(len(tv)))
    assert torch.equal(tv.images[train.indices], train.images) and torch.equal(tv.labels[val.indices], val.labels)
    again, other = load("cifar10", "val", tmp_path), load("cifar10", "val", tmp_path, val_seed=1)
    assert torch.equal(again.indices, val.indices)
    assert not torch.equal(other.indices, val.indices) and Counter(other.labels.tolist()) == Counter(
        val.labels.tolist()
    )
    # the same rule as the offline sets
    rest, held = stratified_split(tv.labels.numpy(), 0.1, seed=0)
    assert np.array_equal(held, val.indices.numpy()) and np.array_equal(rest, train.indices.numpy())
    # copies: editing one loaded split does not change the next load
    val.images.zero_()
    assert torch.equal(load("cifar10", "val", tmp_path).images, again.images)


def test_cifar10_is_stored_at_32px_only(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(InputError, match="32"):
        load("cifar10", "train", tmp_path, image_size=64)


def test_cifar100_fine_labels_and_names(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (200, 3072), dtype=np.uint8)
    y = [i % 100 for i in range(200)]
    for name, n in (("train", 200), ("test", 100)):
        with open(base / name, "wb") as f:
            pickle.dump({"data": x[:n], "fine_labels": y[:n], "coarse_labels": [0] * n}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": ["c"]}, f)
    tv, te = load("cifar100", "trainval", tmp_path), load("cifar100", "test", tmp_path)
    assert tv.images.shape == (200, 3, 32, 32) and te.images.shape == (100, 3, 32, 32)
    assert tv.labels.tolist() == y and tv.num_classes == DATASETS["cifar100"].num_classes == 100
    assert tv.class_names[7] == "fine7"


def test_stl10_labelled_test_and_unlabelled_splits(tmp_path):
    data = write_stl10(tmp_path)
    tv, te = load("stl10", "trainval", tmp_path), load("stl10", "test", tmp_path)
    assert tv.images.shape == (60, 3, 96, 96) and te.images.shape == (10, 3, 96, 96)
    assert np.array_equal(tv.images.numpy(), data["train"][0])  # orientation kept (STL is column-major)
    assert np.array_equal(tv.labels.numpy(), data["train"][1]) and np.array_equal(te.labels.numpy(), data["test"][1])
    assert tv.class_names == tuple(f"stl{i}" for i in range(10))
    unl = load("stl10", "unlabeled", tmp_path)
    assert unl.images.shape == (4, 3, 96, 96) and set(unl.labels.tolist()) == {-1}
    both = load("stl10", "train+unlabeled", tmp_path)
    assert len(both) == 64 and torch.equal(both.images[60:], unl.images) and torch.equal(both.labels[:60], tv.labels)
    assert Counter(load("stl10", "val", tmp_path).labels.tolist()) == dict.fromkeys(range(10), 1)
    assert DATASETS["stl10"].splits[-2:] == ("unlabeled", "train+unlabeled")


# ---------------------------------------------------------------- Tiny-ImageNet (memmap cache)


def _mapped_file(t: torch.Tensor) -> str:
    """The file mapped at the tensor's first byte ("" for anonymous memory), from /proc/self/maps."""
    ptr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            if lo <= ptr < hi:
                return fields[5] if len(fields) > 5 else ""
    return ""


def test_tiny_imagenet_tree_loads_through_the_cache(tmp_path):
    root = tmp_path / "data"
    write_tiny(root / "tiny-imagenet-200")
    tv = load("tiny_imagenet", "trainval", root)
    assert tv.images.shape == (30, 3, 64, 64) and tv.images.dtype == torch.uint8
    assert tv.class_names == WNIDS and DATASETS["tiny_imagenet"].num_classes == 200
    for img, label in zip(tv.images, tv.labels):  # every row's pixels agree with its label
        assert decode_colour(img)[0] == label
    assert {decode_colour(img) for img in tv.images} == {(c, k) for c in range(3) for k in range(10)}
    te = load("tiny_imagenet", "test", root)  # the official val folder, labels from val_annotations.txt
    assert te.images.shape == (6, 3, 64, 64) and te.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert [decode_colour(img) for img in te.images] == [(j % 3, j) for j in range(6)]

    folder = root / "diffssl_cache" / "tiny_imagenet" / "64px"
    meta = json.loads((folder / "trainval.json").read_text())
    assert meta["count"] == 30 and meta["val_source"] == "cache" and meta["val_start"] == 27
    files = (folder / "trainval.files.txt").read_text().split()
    assert all(f.startswith("train/") for f in files) and len(files) == 30

    if Path("/proc/self/maps").exists():  # views over the cache file, not copies
        train, val = load("tiny_imagenet", "train", root), load("tiny_imagenet", "val", root)
        assert _mapped_file(tv.images).endswith("trainval.images.npy")
        assert _mapped_file(train.images).endswith("trainval.images.npy")
        assert _mapped_file(val.images).endswith("trainval.images.npy")
        assert _mapped_file(te.images).endswith("test.images.npy")
        assert not _mapped_file(val.balanced_subset(per_class=1).images).endswith(".npy")  # take() copies


def test_tiny_imagenet_val_split_is_the_seeded_stratified_carve(tmp_path):
    root = tmp_path / "data"
    write_tiny(root / "tiny-imagenet-200")
    tv, train, val = (load("tiny_imagenet", s, root) for s in ("trainval", "train", "val"))
    assert len(train) == 27 and len(val) == 3 and Counter(val.labels.tolist()) == {0: 1, 1: 1, 2: 1}
    assert torch.equal(train.indices, torch.arange(27)) and torch.equal(val.indices, torch.arange(27, 30))
    assert torch.equal(tv.images[val.indices], val.images) and torch.equal(tv.labels[train.indices], train.labels)
    # the held-out images are exactly stratified_split's choice on the source order (class, then file name)
    source_keys = [(c, k) for c in range(3) for k in sorted(range(10), key=str)]
    _, held = stratified_split(np.array([c for c, _ in source_keys]), 0.1, seed=0)
    assert {decode_colour(img) for img in val.images} == {source_keys[i] for i in held}
    assert torch.equal(load("tiny_imagenet", "val", root).images, val.images)  # deterministic
    with pytest.raises(InputError, match="val_seed"):
        load("tiny_imagenet", "val", root, val_seed=1)


def test_cache_is_reused_and_never_rescanned(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_tiny(root / "tiny-imagenet-200")
    first = load("tiny_imagenet", "trainval", root)
    meta = root / "diffssl_cache" / "tiny_imagenet" / "64px" / "trainval.json"
    stamp = meta.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(cache_mod, "decode_image", boom)
    monkeypatch.setattr("diffssl_plugin.data.folders.scan", boom)
    again = load("tiny_imagenet", "trainval", root)
    assert torch.equal(first.images, again.images) and meta.stat().st_mtime_ns == stamp
    # in-place edits stay private (copy-on-write mapping): the file and the next load are unchanged
    again.images[0].fill_(7)
    assert not torch.equal(again.images[0], first.images[0])
    assert torch.equal(load("tiny_imagenet", "trainval", root).images, first.images)


def test_other_image_size_gets_its_own_cache_and_cache_dir_override(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_tiny(root / "tiny-imagenet-200")
    monkeypatch.setenv("DIFFSSL_CACHE_DIR", str(tmp_path / "elsewhere"))
    small = load("tiny_imagenet", "test", root, image_size=32)
    assert small.images.shape == (6, 3, 32, 32)
    assert [decode_colour(img) for img in small.images] == [(j % 3, j) for j in range(6)]  # flat colours survive
    assert (tmp_path / "elsewhere" / "tiny_imagenet" / "32px" / "test.json").is_file()
    assert not (root / "diffssl_cache").exists()
    with pytest.raises(InputError, match="image_size"):
        load("tiny_imagenet", "test", root, image_size=0)


def test_tiny_imagenet_root_may_be_the_dataset_folder(tmp_path):
    write_tiny(tmp_path / "tiny")
    assert len(load("tiny_imagenet", "test", tmp_path / "tiny")) == 6


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_tiny(root / "tiny-imagenet-200")
    bad = root / "tiny-imagenet-200" / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_3.JPEG"
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetNotFoundError, match=f"{WNIDS[1]}_3.JPEG"):
        load("tiny_imagenet", "trainval", root)
    folder = root / "diffssl_cache" / "tiny_imagenet" / "64px"
    assert not [p for p in folder.iterdir() if not p.name.startswith(".trainval.lock")]
    write_image(bad, colour(1, 3), size=(64, 64))
    assert len(load("tiny_imagenet", "trainval", root)) == 30


# ---------------------------------------------------------------- ImageNet and its subset lists


def test_imagenet_trees_subsets_and_centre_crop(tmp_path):
    root = tmp_path / "data"
    one, ten = write_imagenet(root / "imagenet")
    tv = load("imagenet", "trainval", root, image_size=16)
    assert tv.images.shape == (180, 3, 16, 16) and tv.class_names == WNIDS
    val = load("imagenet", "val", root, image_size=16)
    assert Counter(val.labels.tolist()) == {0: 1, 1: 1, 2: 1}  # 1% of 60 per class, rounded
    assert len(load("imagenet", "train", root, image_size=16)) == 177
    te = load("imagenet", "test", root, image_size=16)  # the official val folder
    assert te.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4

    files = (root / "diffssl_cache" / "imagenet" / "16px" / "trainval.files.txt").read_text().split()
    for name, listed in (("train_1pct", one), ("train_10pct", ten)):
        sub = load("imagenet", name, root, image_size=16)
        assert len(sub) == len(listed) and sub.class_names == WNIDS
        assert sorted(os.path.basename(files[i]) for i in sub.indices.tolist()) == sorted(listed)
        assert torch.equal(tv.images[sub.indices], sub.images) and torch.equal(tv.labels[sub.indices], sub.labels)
        assert torch.equal(sub.indices, sub.indices.sort().values)
        assert Counter(sub.labels.tolist()) == {c: len(listed) // 3 for c in range(3)}

    default = load("imagenet", "test", root)  # the registered size
    assert (
        default.images.shape
        == (12, 3, 256, 256)
        == (12, 3, DATASETS["imagenet"].image_size, DATASETS["imagenet"].image_size)
    )


def test_centre_crop_keeps_the_middle(tmp_path):
    path = tmp_path / "bands.png"
    im = Image.new("RGB", (48, 32))
    for x0, c in ((0, (255, 0, 0)), (16, (0, 255, 0)), (32, (0, 0, 255))):
        im.paste(c, (x0, 0, x0 + 16, 32))
    im.save(path)
    out = cache_mod.decode_image(path, 16)  # 48x32 -> 24x16 -> centre 16x16 = source columns 8..40
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8
    assert out[:, 8, 0].tolist() == [255, 0, 0] and out[:, 8, 15].tolist() == [0, 0, 255]
    assert out[:, 8, 8].tolist() == [0, 255, 0]
    grey = cache_mod.decode_image(path, 8, mode="L")
    assert grey.shape == (1, 8, 8)


def test_imagenet_subset_list_missing_or_wrong(tmp_path):
    root = tmp_path / "data"
    write_imagenet(root / "imagenet")
    (root / "imagenet" / "1percent.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="1percent.txt") as ei:
        load("imagenet", "train_1pct", root, image_size=16)
    assert "google-research/simclr" in str(ei.value)
    (root / "imagenet" / "10percent.txt").write_text("n01443537_999.JPEG\n")
    with pytest.raises(DatasetNotFoundError, match="n01443537_999.JPEG"):
        load("imagenet", "train_10pct", root, image_size=16)
    with pytest.raises(UnknownNameError, match="train_1pct"):
        load("imagenet", "train_5pct", root)


def test_imagenet_flat_val_folder_is_explained(tmp_path):
    root = tmp_path / "data"
    write_imagenet(root / "imagenet", per_class=2, val_per_class=0)
    write_image(root / "imagenet" / "val" / "ILSVRC2012_val_00000001.JPEG", (1, 2, 3))
    with pytest.raises(DatasetNotFoundError, match="val/<wnid>"):
        load("imagenet", "test", root, image_size=16)


# ---------------------------------------------------------------- big file-backed sets stay on disk


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_memmapped_imageset_reads_only_what_it_takes(tmp_path):
    n, size = 2000, 128  # 98 MB of images, sparse on disk
    path = tmp_path / "images.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    for i in range(0, n, 97):
        out[i] = i % 256
    out.flush()
    del out
    labels = torch.arange(n) % 10
    before = _rss()
    data = ImageSet(
        "big", "trainval", torch.from_numpy(np.load(path, mmap_mode="c")), labels, tuple("abcdefghij"), torch.arange(n)
    )
    sub = data.balanced_subset(total=20, seed=0)
    part = data.take(torch.tensor([0, 97, 194]))
    head = data.images[:5]
    grown = _rss() - before
    assert len(sub) == 20 and Counter(sub.labels.tolist()) == dict.fromkeys(range(10), 2)
    assert torch.equal(sub.images, data.images[sub.indices])
    assert part.images[:, 0, 0, 0].tolist() == [0, 97, 194] and head.shape == (5, 3, size, size)
    assert grown < 30 * 2**20, f"RSS grew by {grown / 2**20:.1f} MB for a 98 MB set"


# ---------------------------------------------------------------- fine-grained transfer targets


def _savemat(path: Path, obj: dict) -> None:
    import scipy.io

    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, obj)


def write_flowers(root: Path):
    base = root / "flowers-102"
    labels = [1 + (i % 3) for i in range(12)]  # image_00001 .. image_00012, classes 0..2
    for i, lab in enumerate(labels, 1):
        write_image(base / "jpg" / f"image_{i:05d}.jpg", colour(lab - 1, i))
    _savemat(base / "imagelabels.mat", {"labels": np.array(labels)})
    _savemat(base / "setid.mat", {"trnid": np.arange(1, 7), "valid": np.arange(7, 10), "tstid": np.arange(10, 13)})
    return 9, 3, 3, 102


def write_pets(root: Path):
    base = root / "oxford-iiit-pet"
    rows = {"trainval": [], "test": []}
    for split, ks in (("trainval", range(10)), ("test", range(10, 13))):
        for lab, breed in enumerate(("Abyssinian", "american_bulldog")):
            for k in ks:
                write_image(base / "images" / f"{breed}_{k}.jpg", colour(lab, k))
                rows[split].append(f"{breed}_{k} {lab + 1} {lab + 1} 1")
    (base / "annotations").mkdir(parents=True)
    for split, lines in rows.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return 20, None, 6, 37


def write_aircraft(root: Path):
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A300B4", "Cessna 172"]
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    i = 0
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        lines = []
        for j in range(n):
            i += 1
            write_image(data / "images" / f"{1000000 + i}.jpg", colour(j % 3, i))
            lines.append(f"{1000000 + i} {variants[j % 3]}")
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return 9, 3, 3, 100


def write_cars(root: Path):
    base = root / "stanford_cars"
    _savemat(
        base / "devkit" / "cars_meta.mat",
        {"class_names": np.array(["Car A 2001", "Car B 2002", "Car C 2003"], dtype=object)},
    )
    for split, n, mat in (
        ("train", 30, base / "devkit" / "cars_train_annos.mat"),
        ("test", 6, base / "cars_test_annos_withlabels.mat"),
    ):
        ann = np.array([(f"{i + 1:05d}.jpg", 1 + i % 3) for i in range(n)], dtype=[("fname", "O"), ("class", "O")])
        for i in range(n):
            write_image(base / f"cars_{split}" / f"{i + 1:05d}.jpg", colour(i % 3, i % 20))
        _savemat(mat, {"annotations": ann})
    return 30, None, 6, 196


def write_dtd(root: Path):
    base = root / "dtd" / "dtd"
    classes = ["banded", "blotchy", "zigzagged"]
    k = 0
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        lines = []
        for lab, c in enumerate(classes):
            for _ in range(n):
                k += 1
                write_image(base / "images" / c / f"{c}_{k:04d}.jpg", colour(lab, k))
                lines.append(f"{c}/{c}_{k:04d}.jpg")
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    return 9, 3, 3, 47


def write_food(root: Path):
    base = root / "food-101"
    classes = ["apple_pie", "baby_back_ribs"]
    meta = {"train": {c: [] for c in classes}, "test": {c: [] for c in classes}}
    for split, ks in (("train", range(10)), ("test", range(10, 12))):
        for lab, c in enumerate(classes):
            for k in ks:
                write_image(base / "images" / c / f"{100 + k}.jpg", colour(lab, k))
                meta[split][c].append(f"{c}/{100 + k}")
    (base / "meta").mkdir(parents=True)
    for split, m in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(m))
    return 20, None, 4, 101


FINE = {
    "flowers102": write_flowers,
    "oxford_pets": write_pets,
    "fgvc_aircraft": write_aircraft,
    "stanford_cars": write_cars,
    "dtd": write_dtd,
    "food101": write_food,
}


@pytest.mark.parametrize("name", sorted(FINE))
def test_finegrained_official_splits(name, tmp_path):
    root = tmp_path / "data"
    n_trainval, n_official_val, n_test, n_classes = FINE[name](root)
    tv = load(name, "trainval", root, image_size=16)
    train, val, te = (load(name, s, root, image_size=16) for s in ("train", "val", "test"))
    assert tv.images.shape == (n_trainval, 3, 16, 16) and te.images.shape == (n_test, 3, 16, 16)
    assert DATASETS[name].num_classes == n_classes and DATASETS[name].image_size == 224
    assert len(tv.class_names) >= 2 and tv.class_names == te.class_names
    for s in (tv, te):  # labels agree with the pixels each file was written with
        assert [decode_colour(img)[0] for img in s.images] == s.labels.tolist()
    assert len(train) + len(val) == n_trainval
    assert torch.equal(tv.images[val.indices], val.images) and torch.equal(tv.labels[train.indices], train.labels)
    meta = json.loads((root / "diffssl_cache" / name / "16px" / "trainval.json").read_text())
    if n_official_val is not None:
        assert len(val) == n_official_val and meta["val_source"] == "official"
    else:  # carved: 10% of each class
        assert meta["val_source"] == "cache"
        counts = Counter(tv.labels.tolist())
        assert Counter(val.labels.tolist()) == {c: round(0.1 * n) for c, n in counts.items()}
    with pytest.raises(InputError, match="val_seed"):
        load(name, "train", root, image_size=16, val_seed=3)


def test_finegrained_class_names_come_from_torchvision(tmp_path):
    root = tmp_path / "data"
    write_aircraft(root)
    write_cars(root)
    write_pets(root)
    assert load("fgvc_aircraft", "test", root, image_size=8).class_names == ("707-320", "A300B4", "Cessna 172")
    assert load("stanford_cars", "test", root, image_size=8).class_names[1] == "Car B 2002"
    assert load("oxford_pets", "test", root, image_size=8).class_names == ("Abyssinian", "American Bulldog")


# ---------------------------------------------------------------- your own folders


def test_register_image_folder_grey_with_official_val(tmp_path):
    root = tmp_path / "data"
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for lab, c in enumerate(("cats", "dogs")):
            for k in range(n):
                write_image(root / "mine" / split / c / f"{k}.png", colour(lab, k), fmt="PNG")
    register_image_folder("my_grey_test_set", "mine", image_size=12, channels=1, val=True)
    try:
        tv, val, te = (load("my_grey_test_set", s, root) for s in ("trainval", "val", "test"))
        assert tv.images.shape == (12, 1, 12, 12) and tv.class_names == ("cats", "dogs")
        assert len(val) == 4 and len(load("my_grey_test_set", "train", root)) == 8
        assert te.labels.tolist() == [0, 0, 1, 1]
    finally:
        DATASETS.pop("my_grey_test_set")


# ---------------------------------------------------------------- missing data and bad names

EXPECTED_PATH = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "stl10": "stl10_binary",
    "tiny_imagenet": "tiny-imagenet-200/train",
    "imagenet": "imagenet/train",
    "flowers102": "flowers-102/jpg",
    "oxford_pets": "oxford-iiit-pet/annotations",
    "fgvc_aircraft": "fgvc-aircraft-2013b/data",
    "stanford_cars": "stanford_cars/devkit",
    "dtd": "dtd/dtd/labels",
    "food101": "food-101/meta",
}


@pytest.mark.parametrize("name", NEW_SETS)
def test_missing_root_says_what_and_where(name, tmp_path):
    root = tmp_path / "nothing_here"
    root.mkdir()
    with pytest.raises(DatasetNotFoundError) as ei:
        load(name, "train", root)
    msg = str(ei.value)
    assert repr(name) in msg and str(root) in msg and EXPECTED_PATH[name] in msg
    assert "--data-root" in msg
    assert isinstance(ei.value, FileNotFoundError)
    assert not (root / "diffssl_cache").exists()


def test_default_root_is_the_environment_variable(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "env_root")
    monkeypatch.setenv("DIFFSSL_DATA_ROOT", str(tmp_path / "env_root"))
    assert len(load_split("cifar10", "test", download=False)) == 20


def test_failed_download_is_reported_and_bounded(tmp_path):
    seen = []

    def factory(root, download):
        if not download:
            raise RuntimeError("Dataset not found or corrupted.")
        seen.append(socket.getdefaulttimeout())
        raise OSError("Network is unreachable")

    with pytest.raises(DatasetNotFoundError, match="download failed: OSError: Network is unreachable"):
        sources.open_torchvision("cifar10", factory, tmp_path, True, "  ROOT/x", "Get it.")
    assert seen == [sources.NETWORK_TIMEOUT_S] and socket.getdefaulttimeout() is None
    with pytest.raises(DatasetNotFoundError, match="download=False"):
        sources.open_torchvision("cifar10", factory, tmp_path, False, "  ROOT/x", "Get it.")
    assert len(seen) == 1


def test_unknown_names_and_splits():
    with pytest.raises(UnknownNameError) as ei:
        load_split("imagenet21k", "train")
    for n in NEW_SETS:
        assert n in str(ei.value)
    with pytest.raises(UnknownNameError, match="train\\+unlabeled"):
        load_split("stl10", "unlabelled")
    with pytest.raises(UnknownNameError):
        load_split("cifar10", "unlabeled")  # only STL-10 has it
