"""In-memory image arrays: scikit-learn's bundled digits and user ``.npz`` files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# scikit-learn's digits are 8x8 images with grey levels 0..16; see glowlab.likelihood.
DIGITS_N_BINS = 17
DIGITS_SHAPE = (1, 8, 8)


@dataclass(frozen=True)
class ImageArrays:
    """Integer images of shape (N, C, H, W) with levels in ``{0, ..., n_bins - 1}``, and labels.

    References: Theis et al., "A note on the evaluation of generative models", ICLR 2016 (why
    discrete levels are kept and dequantized only when a model sees them).
    """

    images: Tensor
    labels: Tensor | None
    n_bins: int

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(self.images.shape)}")
        if self.labels is not None and self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")


def load_digits_images() -> ImageArrays:
    """The 1797 digits bundled with scikit-learn: (N, 1, 8, 8) uint8 levels 0..16, labels 0..9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8))[:, None]  # (N, 8, 8) -> (N, 1, 8, 8)
    return ImageArrays(images, torch.from_numpy(digits.target.astype(np.int64)), DIGITS_N_BINS)


def load_npz_images(path: str | Path, image_shape: tuple[int, int, int]) -> tuple[Tensor, Tensor | None]:
    """uint8 ``images`` (N, C, H, W) or (N, H, W, C), and optional integer ``labels``, from an .npz file.

    Returns images as (N, C, H, W) uint8 and labels as int64 (or None). Every problem names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected an .npz with an 'images' array)")
    with np.load(path, allow_pickle=False) as npz:
        if "images" not in npz:
            raise KeyError(f"{path}: no 'images' array (found: {', '.join(npz.files) or 'nothing'})")
        images = npz["images"]
        labels = npz["labels"] if "labels" in npz else None
    if images.dtype != np.uint8:
        raise TypeError(f"{path}: 'images' must be uint8, got {images.dtype}")
    c, h, w = image_shape
    if images.ndim == 4 and images.shape[1:] == (h, w, c) and images.shape[1:] != (c, h, w):
        images = images.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if images.ndim != 4 or images.shape[1:] != (c, h, w):
        raise ValueError(
            f"{path}: 'images' has shape {images.shape}, expected (N, {c}, {h}, {w}) or (N, {h}, {w}, {c})"
        )
    out_labels = None
    if labels is not None:
        if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{path}: 'labels' must be {len(images)} integers, got {labels.dtype} of shape {labels.shape}"
            )
        if labels.min(initial=0) < 0:
            raise ValueError(f"{path}: 'labels' has negative values")
        out_labels = torch.from_numpy(labels.astype(np.int64))
    return torch.from_numpy(np.ascontiguousarray(images)), out_labels


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Tensor]:
    """A deterministic train/val/test partition of ``range(n)`` from ``seed``."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 and sum below 1")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return {"test": perm[:n_test], "val": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}
