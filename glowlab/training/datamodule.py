"""LightningDataModule over in-memory image arrays (digits or a user .npz)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from glowlab.data import DIGITS_N_BINS, ImageArrays, load_digits_images, load_npz_images, split_indices
from glowlab.data.arrays import DIGITS_SHAPE
from glowlab.likelihood import dequantize, reduce_bits


class ImageArrayDataModule(L.LightningDataModule):
    """Integer images held in memory, split deterministically, dequantized per batch on the device.

    ``source="digits"`` is scikit-learn's bundled 8x8 digits (17 grey levels, ``n_bins = 17``; no
    ``n_bits``). Any other ``source`` is a path to an ``.npz`` with uint8 ``images`` of
    ``image_shape`` and optional ``labels``; ``n_bits`` (default 8) keeps the top bits. Nothing is
    read until ``setup``, so a config instantiates without its data present. Batches leave the
    loader as integer levels and are dequantized after the transfer to the device.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(
        self,
        source: str = "digits",
        image_shape: tuple[int, int, int] | None = None,
        n_bits: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if source == "digits":
            if n_bits is not None:
                raise ValueError(
                    "data.n_bits: the digits have 17 grey levels and are modelled as they are; leave n_bits unset"
                )
            if image_shape is not None and tuple(image_shape) != DIGITS_SHAPE:
                raise ValueError(f"data.image_shape: the digits are {DIGITS_SHAPE}, got {tuple(image_shape)}")
            image_shape, self.n_bins = DIGITS_SHAPE, DIGITS_N_BINS
        else:
            if image_shape is None:
                raise ValueError(f"data.image_shape is required for source={source!r}")
            n_bits = 8 if n_bits is None else n_bits
            if not 1 <= n_bits <= 8:
                raise ValueError(f"data.n_bits must be in 1..8, got {n_bits}")
            self.n_bins = 2**n_bits
        self.source = source
        self.image_shape = tuple(int(v) for v in image_shape)
        self.n_bits = n_bits
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.num_classes: int | None = None
        self.datasets: dict[str, TensorDataset] = {}

    def _load(self) -> ImageArrays:
        if self.source == "digits":
            return load_digits_images()
        images, labels = load_npz_images(self.source, self.image_shape)
        return ImageArrays(reduce_bits(images, self.n_bits), labels, self.n_bins)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        arrays = self._load()
        labels = arrays.labels if arrays.labels is not None else torch.full((len(arrays.images),), -1)
        self.num_classes = int(arrays.labels.max()) + 1 if arrays.labels is not None else None
        splits = split_indices(len(arrays.images), self.val_fraction, self.test_fraction, self.split_seed)
        for split, idx in splits.items():
            self.datasets[split] = TensorDataset(arrays.images[idx], labels[idx])
        n_train = len(self.datasets["train"])
        if n_train < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} exceeds the {n_train} training images of {self.source}"
            )

    def _loader(self, split: str, train: bool) -> DataLoader:
        if len(self.datasets[split]) == 0:
            raise ValueError(f"the {split} split of {self.source} is empty: raise data.{split}_fraction")
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        levels, labels = batch
        # Fresh uniform noise every time a batch is seen, drawn on the device (cheap on GPU).
        return dequantize(levels, self.n_bins), labels
