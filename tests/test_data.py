"""In-memory image data: digits, .npz files, deterministic splits and the data module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glowlab.data import load_digits_images, load_npz_images, split_indices
from glowlab.training import ImageArrayDataModule


def test_digits_are_17_level_uint8_images() -> None:
    arrays = load_digits_images()
    assert arrays.images.shape == (1797, 1, 8, 8) and arrays.images.dtype == torch.uint8
    assert arrays.images.min() == 0 and arrays.images.max() == 16 and arrays.n_bins == 17
    assert sorted(arrays.labels.unique().tolist()) == list(range(10))


def test_split_is_deterministic_disjoint_and_complete() -> None:
    a = split_indices(1797, 0.1, 0.2, seed=0)
    b = split_indices(1797, 0.1, 0.2, seed=0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [len(a[k]) for k in ("train", "val", "test")] == [1258, 180, 359]
    assert sorted(torch.cat(list(a.values())).tolist()) == list(range(1797))
    assert not torch.equal(split_indices(1797, 0.1, 0.2, seed=1)["test"], a["test"])
    with pytest.raises(ValueError, match=r"val_fraction"):
        split_indices(10, 0.6, 0.5, seed=0)


def test_npz_round_trip_channels_last_and_first(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 6, 4, 3), dtype=np.uint8)  # (N, H, W, C)
    labels = np.arange(7) % 2
    np.savez(tmp_path / "last.npz", images=images, labels=labels)
    np.savez(tmp_path / "first.npz", images=images.transpose(0, 3, 1, 2))
    x, y = load_npz_images(tmp_path / "last.npz", (3, 6, 4))
    assert x.shape == (7, 3, 6, 4) and np.array_equal(x.numpy(), images.transpose(0, 3, 1, 2))
    assert y.tolist() == labels.tolist()
    x2, y2 = load_npz_images(tmp_path / "first.npz", (3, 6, 4))
    assert torch.equal(x, x2) and y2 is None


def test_npz_errors_name_the_file(tmp_path) -> None:
    path = tmp_path / "bad.npz"
    with pytest.raises(FileNotFoundError, match=r"bad.npz"):
        load_npz_images(path, (3, 4, 4))
    np.savez(path, pictures=np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(KeyError, match=r"bad.npz.*no 'images'"):
        load_npz_images(path, (3, 4, 4))
    np.savez(path, images=np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(TypeError, match=r"bad.npz.*uint8"):
        load_npz_images(path, (3, 4, 4))
    np.savez(path, images=np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"bad.npz.*shape"):
        load_npz_images(path, (3, 4, 4))
    np.savez(path, images=np.zeros((2, 3, 4, 4), np.uint8), labels=np.array([0, -1]))
    with pytest.raises(ValueError, match=r"bad.npz.*negative"):
        load_npz_images(path, (3, 4, 4))


def test_digits_datamodule_dequantizes_on_transfer() -> None:
    dm = ImageArrayDataModule(batch_size=32)
    assert dm.image_shape == (1, 8, 8) and dm.n_bins == 17
    dm.setup("fit")
    assert dm.num_classes == 10
    levels, labels = next(iter(dm.train_dataloader()))
    assert levels.dtype == torch.uint8 and levels.shape == (32, 1, 8, 8)
    x, y = dm.on_after_batch_transfer((levels, labels), 0)
    assert x.dtype == torch.float32 and x.min() >= -0.5 and x.max() < 0.5
    assert torch.equal(torch.floor((x + 0.5) * 17).long(), levels.long()) and torch.equal(y, labels)


def test_npz_datamodule_reduces_bits(tmp_path) -> None:
    images = np.full((20, 3, 4, 4), 255, np.uint8)
    np.savez(tmp_path / "d.npz", images=images)
    dm = ImageArrayDataModule(source=str(tmp_path / "d.npz"), image_shape=(3, 4, 4), n_bits=5, batch_size=4)
    assert dm.n_bins == 32
    dm.setup("fit")
    levels, labels = next(iter(dm.train_dataloader()))
    assert levels.max() == 31 and dm.num_classes is None and torch.all(labels == -1)


def test_datamodule_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match=r"data.n_bits"):
        ImageArrayDataModule(n_bits=5)
    with pytest.raises(ValueError, match=r"data.image_shape is required"):
        ImageArrayDataModule(source="cifar.npz")
    with pytest.raises(ValueError, match=r"data.batch_size=5000"):
        ImageArrayDataModule(batch_size=5000).setup("fit")
