"""Small prepared data sets for tests, written by the real ``prepare``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from glowlab.data import PrepareOptions, load_source, prepare


def synthetic_npz(path: Path, n: int, shape: tuple[int, int, int], num_classes: int | None = 3, seed: int = 0) -> Path:
    """Smooth random uint8 images (N, H, W, C) and labels: compressible like real photos."""
    c, h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    phases = rng.uniform(0, 6.3, size=(n, c, 1, 1))
    images = 127.5 * (1 + np.sin(4 * xx + 3 * yy + phases)) + rng.normal(0, 8, size=(n, c, h, w))
    images = np.clip(images, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
    arrays = {"images": images}
    if num_classes:
        arrays["labels"] = np.arange(n) % num_classes
    np.savez(path, **arrays)
    return path


def prepared(root: Path, n: int = 40, shape: tuple[int, int, int] = (3, 8, 8), shard_size: int = 8, **kwargs) -> Path:
    """A prepared npz data set under ``root/data`` (val 0.2, test 0.2 by default)."""
    root.mkdir(parents=True, exist_ok=True)
    npz = synthetic_npz(root / "source.npz", n, shape, num_classes=kwargs.pop("num_classes", 3))
    options = PrepareOptions(shard_size=shard_size, val_fraction=0.2, test_fraction=0.2, **kwargs)
    prepare(load_source("npz", str(npz)), root / "data", options, progress=False)
    return root / "data"


def prepared_digits(root: Path, shard_size: int = 5000) -> Path:
    prepare(load_source("digits"), root, PrepareOptions(shard_size=shard_size), progress=False)
    return root
