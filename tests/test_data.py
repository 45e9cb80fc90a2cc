"""Datasets: IDX checks by content, the search order, the torchvision download path, splits."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from collective_model import data as D
from collective_model.errors import DataNotFoundError

SMALL_COUNTS = {"train": 40, "test": 12}


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        payload = gzip.compress(payload)
        path = path.with_name(path.name + ".gz")
    path.write_bytes(payload)


def write_dataset(folder: Path, counts=SMALL_COUNTS, compress: bool = True, seed: int = 0) -> None:
    """Write the four IDX files of a tiny MNIST-format dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        images = rng.integers(0, 256, size=(count, 28, 28))
        labels = np.arange(count) % 10
        write_idx(folder / D.IDX_FILES[(split, "images")], images, D.IDX_IMAGES_MAGIC, compress)
        write_idx(folder / D.IDX_FILES[(split, "labels")], labels, D.IDX_LABELS_MAGIC, compress)


@pytest.fixture
def small_spec(monkeypatch, tmp_path):
    """Shrink fashion_mnist to 40 + 12 examples and hide the system folder and the user cache."""
    spec = dataclasses.replace(D.SPECS["fashion_mnist"], counts=SMALL_COUNTS, system_dirs=(str(tmp_path / "system"),))
    monkeypatch.setitem(D.SPECS, "fashion_mnist", spec)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("COLLECTIVE_DATA_DIR", raising=False)
    return spec


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_plain_and_gzip(tmp_path, compress):
    images = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    write_idx(tmp_path / "images", images, D.IDX_IMAGES_MAGIC, compress)
    path = tmp_path / ("images.gz" if compress else "images")
    assert np.array_equal(D.read_idx(path, D.IDX_IMAGES_MAGIC, 2, (28, 28)), images)


def test_read_idx_rejects_wrong_magic(tmp_path):
    write_idx(tmp_path / "labels", np.zeros(5), D.IDX_LABELS_MAGIC, compress=False)
    with pytest.raises(D.InvalidDataFile, match="IDX magic number 0x00000801, expected 0x00000803"):
        D.read_idx(tmp_path / "labels", D.IDX_IMAGES_MAGIC, 5, (28, 28))


def test_read_idx_rejects_wrong_count(tmp_path):
    write_idx(tmp_path / "images", np.zeros((3, 28, 28)), D.IDX_IMAGES_MAGIC, compress=False)
    with pytest.raises(D.InvalidDataFile, match=r"shape \(3, 28, 28\), expected \(4, 28, 28\)"):
        D.read_idx(tmp_path / "images", D.IDX_IMAGES_MAGIC, 4, (28, 28))


def test_read_idx_rejects_truncated_file(tmp_path):
    path = tmp_path / "images"
    write_idx(path, np.zeros((3, 28, 28)), D.IDX_IMAGES_MAGIC, compress=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(D.InvalidDataFile, match="bytes of data, expected 2352"):
        D.read_idx(path, D.IDX_IMAGES_MAGIC, 3, (28, 28))


def test_explicit_folder_is_used(small_spec, tmp_path):
    write_dataset(tmp_path / "mine" / "fashion-mnist")
    splits, source = D.find_and_load("fashion_mnist", tmp_path / "mine", download=False)
    assert source == str(tmp_path / "mine" / "fashion-mnist")
    assert splits["train"].images.shape == (40, 1, 28, 28)
    assert splits["test"].labels.tolist() == [i % 10 for i in range(12)]


def test_explicit_folder_is_not_replaced_by_system_folder(small_spec, tmp_path):
    write_dataset(tmp_path / "system")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError) as info:
        D.find_and_load("fashion_mnist", tmp_path / "empty", download=False)
    assert f"{tmp_path / 'empty'}: no train-images-idx3-ubyte[.gz]" in str(info.value)


def test_cache_is_searched_before_system_folder(small_spec, tmp_path):
    write_dataset(tmp_path / "cache" / "collective" / "fashion_mnist", seed=1)
    write_dataset(tmp_path / "system", seed=2)
    _, source = D.find_and_load("fashion_mnist", None, download=False)
    assert source == str(tmp_path / "cache" / "collective" / "fashion_mnist")


def test_system_folder_found_last(small_spec, tmp_path):
    write_dataset(tmp_path / "system")
    _, source = D.find_and_load("fashion_mnist", None, download=False)
    assert source == str(tmp_path / "system")


def test_invalid_files_are_skipped_and_reported(small_spec, tmp_path):
    write_dataset(tmp_path / "cache" / "collective", counts={"train": 39, "test": 12})
    write_dataset(tmp_path / "system")
    _, source = D.find_and_load("fashion_mnist", None, download=False)
    assert source == str(tmp_path / "system")


def test_not_found_lists_every_place_and_the_fix(small_spec, tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        D.find_and_load("fashion_mnist", None, download=False)
    message = str(info.value)
    assert str(tmp_path / "cache" / "collective") in message
    assert str(tmp_path / "system") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_torchvision_download_path(small_spec, tmp_path, monkeypatch):
    """The last resort downloads with torchvision; here from a loopback server with test files."""
    import torchvision.datasets as tv

    served = tmp_path / "served"
    write_dataset(served)
    handler = partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        resources = [(p.name, hashlib.md5(p.read_bytes()).hexdigest()) for p in sorted(served.iterdir())]
        monkeypatch.setattr(tv.FashionMNIST, "mirrors", [f"http://127.0.0.1:{server.server_port}/"])
        monkeypatch.setattr(tv.FashionMNIST, "resources", resources)
        splits, source = D.find_and_load("fashion_mnist", tmp_path / "downloads")
    finally:
        server.shutdown()
    assert source == str(tmp_path / "downloads" / "FashionMNIST" / "raw")
    assert len(splits["train"]) == 40
    assert len(splits["test"]) == 12


def test_failed_download_leaves_no_folder(small_spec, tmp_path, monkeypatch):
    import torchvision.datasets as tv

    monkeypatch.setattr(tv.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])  # discard port: refused
    target = tmp_path / "downloads"
    with pytest.raises(DataNotFoundError, match="torchvision download into .*: failed"):
        D.find_and_load("fashion_mnist", target)
    assert not target.exists()


def test_split_is_seeded_and_disjoint():
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 1, 2, 2).contiguous()
    split = D.ArraySplit(images, torch.arange(100))
    train_a, val_a = D.split_train_val(split, 0.1, seed=3, subset=0)
    train_b, val_b = D.split_train_val(split, 0.1, seed=3, subset=0)
    assert torch.equal(val_a.labels, val_b.labels)
    assert len(val_a) == 10
    assert len(train_a) == 90
    assert set(val_a.labels.tolist()).isdisjoint(train_a.labels.tolist())
    _, val_c = D.split_train_val(split, 0.1, seed=4, subset=0)
    assert not torch.equal(val_a.labels, val_c.labels)


def test_train_subset_limits_training_examples_only():
    split = D.ArraySplit(torch.zeros(100, 1, 2, 2, dtype=torch.uint8), torch.arange(100))
    train, val = D.split_train_val(split, 0.2, seed=0, subset=30)
    assert len(train) == 30
    assert len(val) == 20


def test_normalizer_matches_formula():
    spec = D.SPECS["fashion_mnist"]
    images = torch.tensor([[[[0, 255], [128, 64]]]], dtype=torch.uint8)
    out = D.Normalizer(spec, "cpu")(images)
    expected = (images.float() / 255 - spec.mean[0]) / spec.std[0]
    assert out.shape == (1, 4)
    assert torch.allclose(out, expected.view(1, 4), atol=1e-6)


def test_augmentation_only_with_generator():
    spec = D.SPECS["fashion_mnist"]
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    normalizer = D.Normalizer(spec, "cpu")
    assert torch.equal(normalizer(images), normalizer(images))
    augmented = normalizer(images, torch.Generator().manual_seed(0))
    assert not torch.equal(augmented, normalizer(images))
    again = normalizer(images, torch.Generator().manual_seed(0))
    assert torch.equal(augmented, again)


def test_iterate_batches_covers_every_example_once():
    split = D.ArraySplit(torch.zeros(10, 1, 1, 1, dtype=torch.uint8), torch.arange(10))
    seen = [labels for _, labels in D.iterate_batches(split, 4, torch.Generator().manual_seed(0))]
    assert [len(b) for b in seen] == [4, 4, 2]
    assert sorted(torch.cat(seen).tolist()) == list(range(10))
