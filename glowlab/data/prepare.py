"""``glowlab prepare``: write an image source as WebDataset tar shards plus ``manifest.json``.

Layout of a prepared data set (``OUT``)::

    OUT/manifest.json          image shape, bins, classes, splits, shards with sizes and sha256
    OUT/prepare.json           the options of the run (lets an interrupted run resume)
    OUT/train-000000.tar ...   WebDataset shards: "<key>.png" (or ".npy") and "<key>.cls" per sample
    OUT/val-000000.tar ...
    OUT/test-000000.tar ...

Keys are the sample's position within its split, zero-padded to 8 digits, so a shard and key name
every sample. Every file is written under a ``.partial`` name and renamed when complete, and the
manifest is written last: an interrupted run never leaves a shard or manifest that looks complete.
Re-running with the same options keeps the finished shards and writes the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from glowlab.data.sources import ImageSource
from glowlab.files import write_text

FORMAT = "glowlab-webdataset"
VERSION = 1
RESAMPLE = ("box", "lanczos", "bicubic", "bilinear", "nearest")
PAYLOADS = ("png", "npy")


@dataclass(frozen=True)
class PrepareOptions:
    """What ``glowlab prepare`` does to a source; stored in ``prepare.json`` and the manifest."""

    resolution: int | None = None
    resample: str = "box"
    payload: str = "png"
    shard_size: int = 5000
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    n_bits_hint: int | None = None

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLE:
            raise ValueError(f"--resample {self.resample!r}: choose one of {', '.join(RESAMPLE)}")
        if self.payload not in PAYLOADS:
            raise ValueError(f"--payload {self.payload!r}: choose one of {', '.join(PAYLOADS)}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"--resolution must be >= 1, got {self.resolution}")
        if self.n_bits_hint is not None and not 1 <= self.n_bits_hint <= 8:
            raise ValueError(f"--n-bits must be in 1..8, got {self.n_bits_hint}")


def split_order(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A deterministic train/val/test partition of ``range(n)``, each split in a seeded random order."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 and sum below 1")
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return {"train": perm[n_test + n_val :], "val": perm[n_test : n_test + n_val], "test": perm[:n_test]}


def plan_splits(source: ImageSource, options: PrepareOptions) -> dict[str, np.ndarray]:
    """Source indices per split: the source's official test split if it has one, else seeded fractions."""
    if "test" in source.splits:
        train = source.splits["train"]
        inner = split_order(len(train), options.val_fraction, 0.0, options.seed)
        rng = np.random.default_rng(options.seed + 1)
        return {
            "train": train[inner["train"]],
            "val": train[inner["val"]],
            "test": rng.permutation(source.splits["test"]),
        }
    return split_order(len(source), options.val_fraction, options.test_fraction, options.seed)


def transform(image: np.ndarray, resolution: int | None, resample: str) -> np.ndarray:
    """Resize the shorter side to ``resolution`` (antialiased) and centre-crop a square; uint8 (H, W, C)."""
    if resolution is None or image.shape[:2] == (resolution, resolution):
        return image
    from PIL import Image

    h, w = image.shape[:2]
    scale = resolution / min(h, w)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    img = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    img = img.resize(size, getattr(Image.Resampling, resample.upper()))
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    out = np.asarray(img.crop((left, top, left + resolution, top + resolution)))
    return out[:, :, None] if out.ndim == 2 else out  # (H, W) -> (H, W, 1)


def encode(image: np.ndarray, payload: str) -> bytes:
    """Lossless bytes of an (H, W, C) uint8 image: PNG (grey or RGB) or a .npy array."""
    buf = io.BytesIO()
    if payload == "npy":
        np.save(buf, image, allow_pickle=False)
    else:
        from PIL import Image

        Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: identical reruns, identical bytes
    tar.addfile(info, io.BytesIO(data))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class _ShardTask:
    split: str
    shard: int
    first: int
    indices: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.shard:06d}.tar"


_SOURCE: ImageSource | None = None  # set in each worker process by _init_worker


def _init_worker(source: ImageSource) -> None:
    global _SOURCE
    _SOURCE = source


def _write_shard(args: tuple[_ShardTask, PrepareOptions, str, tuple[int, int, int] | None]) -> dict:
    """Write one shard under a .partial name, then rename; returns its manifest entry."""
    task, options, out, shape = args
    source = _SOURCE
    path = Path(out) / task.name
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for offset, i in enumerate(task.indices):
            image = transform(np.asarray(source.image(i)), options.resolution, options.resample)
            if image.dtype != np.uint8:
                raise ValueError(f"{source.describe(i)}: pixel type {image.dtype}, expected uint8")
            found = (image.shape[2], image.shape[0], image.shape[1])
            if shape is not None and found != shape:
                raise ValueError(
                    f"{source.describe(i)}: image is {found[1]}x{found[2]}x{found[0]} but earlier images are "
                    f"{shape[1]}x{shape[2]}x{shape[0]}; pass --resolution to resize and crop all images alike"
                )
            key = f"{task.first + offset:08d}"
            _add(tar, f"{key}.{options.payload}", encode(image, options.payload))
            if source.labels is not None:
                _add(tar, f"{key}.cls", str(int(source.labels[i])).encode())
            if source.attributes is not None:
                _add(tar, f"{key}.attr", "".join("1" if v else "0" for v in source.attributes[i]).encode())
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(partial, path)
    return _shard_entry(path, task)


def _tasks(order: dict[str, np.ndarray], shard_size: int) -> Iterator[_ShardTask]:
    for split, idx in order.items():
        for shard, first in enumerate(range(0, len(idx), shard_size)):
            yield _ShardTask(split, shard, first, tuple(int(i) for i in idx[first : first + shard_size]))


def prepare(
    source: ImageSource,
    out: str | Path,
    options: PrepareOptions,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write ``source`` as shards under ``out`` and return the manifest (also written to ``out``).

    One ``prepare`` writes into a folder at a time (a lock; a second one stops with an error). The
    journal ``prepare.json`` records the options, a fingerprint of the source and the files this
    preparation writes: running the same command again resumes an interrupted run (finished shards
    are kept) or, on a complete one, checks every shard against the manifest and rebuilds exactly
    the missing or changed ones. A changed source stops with an error rather than mixing old and
    new images. ``overwrite`` replaces a preparation with other options, deleting only the files
    its journal (or manifest) lists, never other files in ``out``.
    """
    out = Path(out)
    if len(source) == 0:
        raise ValueError(f"{source.location or source.kind}: the source holds no images")
    if options.n_bits_hint is not None and source.n_bins != 256:
        raise ValueError(
            f"--n-bits {options.n_bits_hint}: {source.location or source.kind} has {source.n_bins} grey levels; "
            "--n-bits keeps the top bits of 8-bit (256-level) data only"
        )
    out.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out):
        return _prepare_locked(source, out, options, workers, overwrite, progress)


def _prepare_locked(
    source: ImageSource, out: Path, options: PrepareOptions, workers: int, overwrite: bool, progress: bool
) -> dict:
    order = plan_splits(source, options)
    tasks = list(_tasks(order, options.shard_size))
    names = [t.name for t in tasks]
    request = {
        "source": {
            "kind": source.kind,
            "location": source.location,
            "count": len(source),
            "fingerprint": source.fingerprint(),
        },
        **asdict(options),
    }
    journal_path, manifest_path = out / "prepare.json", out / "manifest.json"
    journal = _read_journal(journal_path)
    previous = _read_json(manifest_path)
    if journal is not None and journal["request"] != request:
        old = journal["request"]
        same_source = {k: v for k, v in old.get("source", {}).items() if k != "fingerprint"} == {
            k: v for k, v in request["source"].items() if k != "fingerprint"
        }
        changed = same_source and old.get("source", {}).get("fingerprint") != request["source"]["fingerprint"]
        if not overwrite:
            if changed and {k: v for k, v in old.items() if k != "source"} == asdict(options):
                raise FileExistsError(
                    f"{source.location or source.kind} changed since {out} was prepared from it ({journal_path}): "
                    "resuming or repairing would mix old and new images; pass --overwrite to prepare it anew"
                )
            raise FileExistsError(
                f"{out} holds a preparation with other options ({journal_path}); "
                "pass --overwrite to replace it or choose another --out"
            )
        _remove_ours(out, journal["files"], previous)
        journal, previous = None, None
    elif journal is None and previous is not None:
        if not overwrite:
            raise FileExistsError(f"{out} already holds a prepared data set; pass --overwrite to replace it")
        _remove_ours(out, [], previous)
        previous = None
    foreign = [n for n in names if (out / n).exists() and (journal is None or n not in journal["files"])]
    if foreign:
        raise FileExistsError(f"{out / foreign[0]}: a file glowlab prepare did not write has a shard's name")
    _write_atomic(journal_path, json.dumps({"request": request, "files": names}, indent=2) + "\n")
    for name in names:
        (out / (name + ".partial")).unlink(missing_ok=True)

    shape = _expected_shape(source, order, options)
    recorded = {s["name"]: s for split in (previous or {}).get("splits", {}).values() for s in split["shards"]}
    entries, todo = [], []
    for task in tasks:
        path = out / task.name
        if path.exists() and (not recorded or _matches(path, recorded.get(task.name))):
            entries.append(_shard_entry(path, task))
        else:
            if recorded and path.exists() and progress:
                print(f"{path}: differs from the manifest; rebuilding it")
            todo.append(task)
    if previous is not None and not todo:
        if progress:
            print(f"{out}: already prepared with these options, every shard as the manifest says; nothing to do")
        return previous
    bar = _progress(sum(len(t.indices) for t in tasks), sum(e["count"] for e in entries), progress, out)
    jobs = [(t, options, str(out), shape) for t in todo]
    if workers > 1 and len(todo) > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ctx.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(source,)) as pool:
            for entry in pool.imap_unordered(_write_shard, jobs):
                entries.append(entry)
                bar.update(entry["count"])
    else:
        _init_worker(source)
        for job in jobs:
            entry = _write_shard(job)
            entries.append(entry)
            bar.update(entry["count"])
    bar.close()

    c, h, w = shape
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "source": request["source"],
        "image_shape": [c, h, w],
        "n_bins": source.n_bins,
        "n_bits_hint": options.n_bits_hint,
        "num_classes": _num_classes(source),
        "class_names": source.class_names,
        "attribute_names": source.attribute_names,
        "payload": options.payload,
        "options": asdict(options),
        "splits": {
            split: {
                "count": len(idx),
                "shards": sorted(
                    ({k: e[k] for k in ("name", "count", "size", "sha256")} for e in entries if e["split"] == split),
                    key=lambda e: e["name"],
                ),
            }
            for split, idx in order.items()
        },
    }
    _write_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _read_journal(path: Path) -> dict | None:
    """``{"request", "files"}``; a journal of an earlier version (the request alone) lists no files."""
    found = _read_json(path)
    if found is None:
        return None
    return found if "request" in found else {"request": found, "files": []}


def _matches(path: Path, entry: dict | None) -> bool:
    """Whether a finished shard is what the manifest recorded (size, then sha256)."""
    return entry is not None and path.stat().st_size == entry["size"] and sha256_of(path) == entry["sha256"]


@contextlib.contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.prepare.lock`` for the run; a second ``prepare`` into ``out`` stops at once."""
    import fcntl

    with open(out / ".prepare.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exn:
            raise FileExistsError(
                f"{out}: another glowlab prepare is writing into it; wait for it to finish or choose another --out"
            ) from exn
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _expected_shape(source: ImageSource, order: dict[str, np.ndarray], options: PrepareOptions) -> tuple[int, int, int]:
    first = next(int(idx[0]) for idx in order.values() if len(idx))
    image = transform(np.asarray(source.image(first)), options.resolution, options.resample)
    return (image.shape[2], image.shape[0], image.shape[1])


def _num_classes(source: ImageSource) -> int | None:
    if source.class_names:
        return len(source.class_names)
    return int(source.labels.max()) + 1 if source.labels is not None and len(source.labels) else None


def _shard_entry(path: Path, task: _ShardTask) -> dict:
    """The manifest entry of a finished shard (also of one kept from an interrupted run)."""

    return {
        "split": task.split,
        "name": task.name,
        "count": len(task.indices),
        "size": path.stat().st_size,
        "sha256": sha256_of(path),
    }


def _remove_ours(out: Path, files: list[str], manifest: dict | None) -> None:
    """Delete only what an earlier ``prepare`` wrote (its journal's files, its manifest's shards)."""
    names = set(files) | {s["name"] for split in (manifest or {}).get("splits", {}).values() for s in split["shards"]}
    for name in names:
        for path in (out / name, out / (name + ".partial")):
            path.unlink(missing_ok=True)
    for name in ("manifest.json", "prepare.json"):
        (out / name).unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    write_text(path, text)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool, out: Path):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc=f"prepare {out}")
