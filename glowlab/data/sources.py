"""Image sources that ``glowlab prepare`` turns into shards: indexable, picklable, no model code."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# scikit-learn's digits are 8x8 images with grey levels 0..16; see glowlab.likelihood.
DIGITS_N_BINS = 17
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SOURCES = ("digits", "folder", "cifar10", "cifar100", "npz")


@dataclass
class ImageSource:
    """A data set as ``len(source)`` items; ``source.image(i)`` is an (H, W, C) uint8 array.

    ``n_bins`` is the number of grey levels the pixel values use (256 for 8-bit images, 17 for the
    digits). ``splits`` holds the data set's official partition (e.g. CIFAR's train/test) as index
    lists, or is empty when glowlab should split at random. ``attributes`` are optional binary
    columns (N, A) named by ``attribute_names`` (e.g. CelebA's "Smiling"). ``describe(i)`` names
    item ``i`` in error messages (a file path, or the archive and position).

    References: Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009.
    """

    kind: str
    location: str | None
    labels: np.ndarray | None
    class_names: list[str] | None
    n_bins: int = 256
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    arrays: np.ndarray | None = None
    files: Sequence[Path] = ()
    channels: int = 3
    attributes: np.ndarray | None = None
    attribute_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.arrays) if self.arrays is not None else len(self.files)

    def describe(self, i: int) -> str:
        return str(self.files[i]) if self.files else f"{self.location or self.kind}[{i}]"

    def fingerprint(self) -> str:
        """A digest of what the source holds, recorded by ``prepare`` to notice a changed source.

        In-memory sources (digits, npz, CIFAR) hash their pixels, labels and attributes; image
        folders hash each file's relative path, size and modification time (reading every image
        of a large folder would take longer than preparing it), so an edited file counts as a change.
        """
        digest = hashlib.sha256()
        if self.arrays is not None:
            digest.update(np.ascontiguousarray(self.arrays).tobytes())
        else:
            root = Path(self.location or ".")
            for path in self.files:
                stat = path.stat()
                digest.update(f"{path.relative_to(root) if path.is_relative_to(root) else path}".encode())
                digest.update(f":{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        for extra in (self.labels, self.attributes):
            if extra is not None:
                digest.update(np.ascontiguousarray(extra).tobytes())
        return digest.hexdigest()

    def image(self, i: int) -> np.ndarray:
        if self.arrays is not None:
            return self.arrays[i]
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[i]) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
                array = np.asarray(img)
        except (OSError, UnidentifiedImageError) as exn:
            raise ValueError(f"{self.files[i]}: cannot decode image ({exn})") from exn
        return array[:, :, None] if array.ndim == 2 else array  # (H, W) -> (H, W, 1)


def digits_source() -> ImageSource:
    """The 1797 8x8 digits bundled with scikit-learn: levels 0..16, labels 0..9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)[:, :, :, None]  # (N, 8, 8) -> (N, 8, 8, 1)
    names = [str(d) for d in range(10)]
    return ImageSource("digits", None, digits.target.astype(np.int64), names, DIGITS_N_BINS, arrays=images, channels=1)


def npz_source(path: str | Path) -> ImageSource:
    """uint8 ``images`` (N, H, W, C) or (N, C, H, W) with C in {1, 3}, and optional ``labels``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected an .npz with an 'images' array)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not hasattr(npz, "files"):
                raise ValueError("a single .npy array, not an .npz archive")
            if "images" not in npz:
                raise KeyError(f"{path}: no 'images' array (found: {', '.join(npz.files) or 'nothing'})")
            images = npz["images"]
            labels = npz["labels"] if "labels" in npz else None
            attributes = npz["attributes"] if "attributes" in npz else None
            names = [str(n) for n in npz["attribute_names"]] if "attribute_names" in npz else None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exn:
        raise ValueError(f"{path}: not a readable .npz archive ({exn})") from exn
    if images.dtype != np.uint8:
        raise ValueError(
            f"{path}: 'images' holds {images.dtype} values; glowlab prepare npz takes uint8 pixel values (0..255)"
        )
    if len(images) == 0:
        raise ValueError(f"{path}: 'images' holds no images")
    if images.ndim == 3:
        images = images[:, :, :, None]  # (N, H, W) -> (N, H, W, 1)
    if images.ndim != 4 or (images.shape[3] not in (1, 3) and images.shape[1] not in (1, 3)):
        raise ValueError(
            f"{path}: 'images' has shape {images.shape}; expected (N, H, W, C) or (N, C, H, W), C in 1 or 3"
        )
    if images.shape[3] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
    if labels is not None:
        labels = _check_labels(labels, len(images), str(path))
    if attributes is not None:
        attributes, names = _check_attributes(attributes, names, len(images), str(path))
    return ImageSource(
        "npz",
        str(path),
        labels,
        None,
        arrays=np.ascontiguousarray(images),
        channels=images.shape[3],
        attributes=attributes,
        attribute_names=names,
    )


def folder_source(root: str | Path, channels: int = 3, attributes_file: str | Path | None = None) -> ImageSource:
    """An image tree like torchvision's ImageFolder: class = sub-folder name (sorted).

    Images directly in ``root`` (no sub-folders) make an unlabelled source. ``attributes_file`` is
    a table in CelebA's ``list_attr_celeba.txt`` format (optional count line, a line of attribute
    names, then ``file v1 v2 ...`` with values 1/-1 or 1/0) matched to images by file name.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = _image_files(root / name)
        files += found
        labels += [label] * len(found)
    if not classes:
        files = _image_files(root)
    if not files:
        raise ValueError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    attributes, names = _read_attribute_table(Path(attributes_file), files) if attributes_file else (None, None)
    return ImageSource(
        "folder",
        str(root),
        np.asarray(labels, dtype=np.int64) if classes else None,
        classes or None,
        files=files,
        channels=channels,
        attributes=attributes,
        attribute_names=names,
    )


def cifar_source(path: str | Path, num_classes: int = 10) -> ImageSource:
    """CIFAR-10/100 from the python-pickle release: the ``.tar.gz`` or its extracted folder.

    Keeps the official split: the 50000 training images are ``train`` and the 10000 test images
    ``test``.
    """
    path = Path(path)
    if num_classes == 10:
        train_names, test_names, meta_name, label_key, names_key = (
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            "batches.meta",
            b"labels",
            b"label_names",
        )
    elif num_classes == 100:
        train_names, test_names, meta_name, label_key, names_key = (
            ["train"],
            ["test"],
            "meta",
            b"fine_labels",
            b"fine_label_names",
        )
    else:
        raise ValueError(f"CIFAR has 10 or 100 classes, got {num_classes}")
    members = _cifar_members(path, train_names + test_names + [meta_name])
    parts = []
    for name in train_names + test_names:
        batch = _unpickle(members[name], f"{path}:{name}")
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # (N, 3072) -> (N, 3, 32, 32)
        parts.append((data.transpose(0, 2, 3, 1), np.asarray(batch[label_key], dtype=np.int64)))  # (N, 32, 32, 3)
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    n_train = sum(len(p[0]) for p in parts[: len(train_names)])
    meta = _unpickle(members[meta_name], f"{path}:{meta_name}")
    names = [n.decode() for n in meta[names_key]]
    labels = _check_labels(labels, len(images), str(path), num_classes)
    splits = {"train": np.arange(n_train), "test": np.arange(n_train, len(images))}
    return ImageSource(f"cifar{num_classes}", str(path), labels, names, splits=splits, arrays=images)


def load_source(
    kind: str, path: str | None = None, channels: int = 3, attributes_file: str | None = None
) -> ImageSource:
    """The source called ``kind`` (one of ``SOURCES``) at ``path``."""
    if attributes_file is not None and kind != "folder":
        raise ValueError("--attributes applies to folder sources (npz files carry an 'attributes' array)")
    if kind not in SOURCES:
        raise ValueError(f"unknown source {kind!r}; choose one of {', '.join(SOURCES)}")
    if kind == "digits":
        return digits_source()
    if path is None:
        raise ValueError(f"source {kind!r} needs a path")
    if kind == "npz":
        return npz_source(path)
    if kind == "folder":
        return folder_source(path, channels, attributes_file)
    return cifar_source(path, 10 if kind == "cifar10" else 100)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _check_labels(labels: np.ndarray, n: int, where: str, num_classes: int | None = None) -> np.ndarray:
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: 'labels' must be {n} integers, got {labels.dtype} of shape {labels.shape}")
    if n and labels.min() < 0:
        raise ValueError(f"{where}: 'labels' has negative values")
    if n and num_classes is not None and labels.max() >= num_classes:
        raise ValueError(f"{where}: label {labels.max()} is out of range for {num_classes} classes")
    return labels.astype(np.int64)


def _check_attributes(
    attributes: np.ndarray, names: list[str] | None, n: int, where: str
) -> tuple[np.ndarray, list[str]]:
    if attributes.ndim != 2 or len(attributes) != n or not np.issubdtype(attributes.dtype, np.integer):
        raise ValueError(
            f"{where}: 'attributes' must be integers of shape ({n}, A), got {attributes.dtype} {attributes.shape}"
        )
    values = set(np.unique(attributes).tolist())
    if not values <= {-1, 0, 1}:
        raise ValueError(f"{where}: 'attributes' must be binary (1 and 0 or -1), found {sorted(values)}")
    names = names or [f"attr{j}" for j in range(attributes.shape[1])]
    if len(names) != attributes.shape[1]:
        raise ValueError(f"{where}: {len(names)} attribute names for {attributes.shape[1]} columns")
    return (attributes == 1).astype(np.uint8), names


def _read_attribute_table(path: Path, files: Sequence[Path]) -> tuple[np.ndarray, list[str]]:
    """Attributes per file from a CelebA-style table, in the order of ``files``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such attribute table")
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if lines and len(lines[0]) == 1 and lines[0][0].isdigit():
        lines = lines[1:]  # the count line
    if not lines:
        raise ValueError(f"{path}: empty attribute table")
    names, rows = lines[0], {}
    for number, row in enumerate(lines[1:], start=3):
        if len(row) != len(names) + 1:
            raise ValueError(f"{path}:{number}: {len(row) - 1} values for {len(names)} attributes")
        try:
            rows[row[0]] = [int(v) for v in row[1:]]
        except ValueError as exn:
            raise ValueError(f"{path}:{number}: values must be integers") from exn
    missing = [f.name for f in files if f.name not in rows]
    if missing:
        raise ValueError(f"{path}: no attributes for {len(missing)} images, e.g. {missing[0]}")
    return _check_attributes(np.asarray([rows[f.name] for f in files]), names, len(files), str(path))


def _cifar_members(path: Path, names: list[str]) -> dict[str, bytes]:
    """Raw bytes of the named batch files, from an extracted folder or the release tarball."""
    if path.is_dir():
        folder = next((d for d in (path, *sorted(path.iterdir())) if d.is_dir() and (d / names[0]).is_file()), None)
        if folder is None:
            raise FileNotFoundError(f"{path}: no CIFAR batch file {names[0]!r} here or one folder down")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: missing CIFAR batch files {', '.join(missing)}")
        return {n: (folder / n).read_bytes() for n in names}
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such CIFAR archive or folder")
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = Path(member.name).name
                if base in names and member.isfile():
                    found[base] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exn:
        raise ValueError(f"{path}: not a readable CIFAR archive ({exn})") from exn
    missing = [n for n in names if n not in found]
    if missing:
        raise FileNotFoundError(f"{path}: archive lacks CIFAR batch files {', '.join(missing)}")
    return found


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches' dicts, lists and numpy arrays, and refuses any other class,
    so a tampered archive cannot run code."""

    allowed = frozenset({"_reconstruct", "ndarray", "dtype", "scalar"})

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" and name in self.allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exn:
        raise ValueError(f"{where}: not a CIFAR pickle batch ({exn})") from exn
