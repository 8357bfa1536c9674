"""Reading prepared shards: manifest checks, sample decoding, and a rank- and worker-aware stream.

Shards are read from local paths, URLs or ``pipe:`` commands (anything ``webdataset.gopen`` opens,
e.g. ``pipe:aws s3 cp s3://bucket/cifar10/train-000000.tar -``).

Splitting rule, the same for training and evaluation: the reader slots are the ``world_size x
num_workers`` (rank, worker) pairs. With at least as many shards as slots, each slot reads whole
shards (``shards[slot::slots]``); with fewer, every slot reads all shards and keeps the samples
whose index ``% slots == slot``. Either way each sample goes to exactly one slot per pass.
Training repeats passes forever, reshuffling the shard order each pass with a seed all ranks
share, and every slot yields the same number of batches per epoch, so ranks never wait on each
other. Evaluation makes one pass in order, so every sample is seen exactly once across all ranks.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import random
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from glowlab.data.prepare import FORMAT, VERSION
from glowlab.likelihood import reduce_bits


class DataError(ValueError):
    """Bad or inconsistent data, with the shard and key it was found in."""


BAD_SAMPLE_POLICIES = ("error", "skip")


def _is_url(root: str) -> bool:
    return "://" in root or root.startswith("pipe:")


def prepare_hint(root: str) -> str:
    """The `glowlab prepare` command that writes ``root``, guessed from its name (cifar10, digits, ...)."""
    name = root.rstrip("/").rsplit("/", 1)[-1].lower().replace("-", "").replace("_", "")
    if name.startswith("cifar100"):
        return f"e.g. `glowlab prepare cifar100 PATH/cifar-100-python.tar.gz --out {root}`"
    if name.startswith("cifar"):
        return f"e.g. `glowlab prepare cifar10 PATH/cifar-10-python.tar.gz --out {root}`"
    if name.startswith("digits"):
        return f"with `glowlab prepare digits --out {root}`"
    return (
        f"e.g. `glowlab prepare folder PATH/images --out {root}` (sources: digits, folder, cifar10, cifar100, npz; "
        "`glowlab prepare --help`)"
    )


def read_manifest(root: str) -> dict:
    """Load and check ``<root>/manifest.json`` (a folder, URL prefix or ``pipe:`` command prefix)."""
    location = f"{root.rstrip('/')}/manifest.json"
    try:
        if _is_url(root):
            import webdataset as wds

            with wds.gopen(location, "rb") as f:
                text = f.read().decode()
        else:
            text = Path(location).read_text()
    except (OSError, ValueError) as exn:
        raise DataError(
            f"{location}: cannot read the manifest ({exn}); prepare the data first, {prepare_hint(root)}"
        ) from exn
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exn:
        raise DataError(f"{location}: not valid JSON ({exn})") from exn
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{location}: not a {FORMAT} v{VERSION} manifest")
    for key in ("image_shape", "n_bins", "splits", "payload"):
        if key not in manifest:
            raise DataError(f"{location}: missing {key!r}")
    return manifest


@dataclass(frozen=True)
class DataContract:
    """What a prepared image data set offers a model: shape, grey levels (after ``n_bits``), classes."""

    image_shape: tuple[int, int, int]
    n_bins: int
    num_classes: int | None
    n_bits: int | None

    def describe(self) -> str:
        classes = f", {self.num_classes} classes" if self.num_classes else ", no labels"
        return f"{'x'.join(map(str, self.image_shape))} images with {self.n_bins} grey levels{classes}"


def data_contract(root: str, manifest: dict | None = None, n_bits: int | None = None) -> DataContract:
    """The :class:`DataContract` of the prepared data at ``root``; ``n_bits`` defaults to prepare's hint.

    An ``n_bits`` applies to 8-bit data only (it keeps the top bits of 256 levels).
    """
    manifest = read_manifest(root) if manifest is None else manifest
    stored_bins = int(manifest["n_bins"])
    n_bits = manifest.get("n_bits_hint") if n_bits is None else n_bits
    if n_bits is not None:
        if stored_bins != 256:
            raise ValueError(f"data.n_bits={n_bits}: {root} stores {stored_bins} grey levels, not 8-bit data")
        if not 1 <= n_bits <= 8:
            raise ValueError(f"data.n_bits must be in 1..8, got {n_bits}")
    return DataContract(
        image_shape=tuple(int(v) for v in manifest["image_shape"]),
        n_bins=2**n_bits if n_bits is not None else stored_bins,
        num_classes=manifest.get("num_classes"),
        n_bits=n_bits,
    )


def shard_counts(manifest: dict, split: str) -> list[int]:
    """Samples in each shard of ``split``, in the manifest's order (the order of :func:`shard_urls`)."""
    return [int(s["count"]) for s in manifest["splits"][split]["shards"]]


def shard_urls(root: str, manifest: dict, split: str) -> list[str]:
    """The shard locations of ``split``; local shards must exist with the manifest's sizes."""
    if split not in manifest["splits"]:
        raise DataError(f"{root}/manifest.json: no {split!r} split (has {', '.join(manifest['splits'])})")
    urls = []
    for shard in manifest["splits"][split]["shards"]:
        url = f"{root.rstrip('/')}/{shard['name']}"
        if not _is_url(root):
            path = Path(url)
            if not path.is_file():
                raise DataError(f"{url}: shard listed in the manifest is missing")
            if path.stat().st_size != shard["size"]:
                raise DataError(
                    f"{url}: {path.stat().st_size} bytes, the manifest says {shard['size']} (truncated or replaced)"
                )
        urls.append(url)
    return urls


# Local shards this process has checked against their manifest sha256: (path, size, mtime_ns).
_VERIFIED: set[tuple[str, int, int]] = set()


def verify_shard(url: str, sha256: str) -> None:
    """Check a local shard's bytes against the manifest's sha256, once per process and file version.

    A shard whose bytes changed but still decode would otherwise be read without complaint. Hashing
    runs at disk speed, before the first sample is used, and only the first time this process
    (a data-loader worker, a rank) opens that file (``benchmarks/loader_throughput.py`` measures
    the cost). Remote shards (URLs, ``pipe:``) are hashed as they stream in: see :func:`iter_tar`.
    """
    path = Path(url)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    from glowlab.data.prepare import sha256_of

    found = sha256_of(path)
    if found != sha256:
        raise DataError(
            f"{url}: its sha256 is {found[:16]}..., the manifest's {sha256[:16]}...: the shard changed after "
            "prepare (run glowlab verify DATA; running the same glowlab prepare again rebuilds it)"
        )
    _VERIFIED.add(key)


class _Hashing:
    """A read-only stream that hashes what is read from it (remote shards, checked at their end)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        return data


def iter_tar(url: str, expected: int | None = None, sha256: str | None = None) -> Iterator[dict]:
    """Samples of one shard as ``{"__key__", "__url__", <ext>: bytes}``, members grouped by key.

    Python's tarfile ends quietly at a damaged header after the first member, so the number of
    samples is checked against ``expected`` (the manifest's count): a short shard is an error.
    With ``sha256`` the shard's bytes are checked too: a local file before its first sample (once
    per process), a remote one as it streams (an error at its end, naming it).
    """
    import webdataset as wds

    remote = _is_url(url)
    if sha256 is not None and not remote:
        verify_shard(url, sha256)
    current: dict | None = None
    seen = 0
    hashing = None
    try:
        with wds.gopen(url, "rb") as stream:
            hashing = _Hashing(stream) if sha256 is not None and remote else None
            with tarfile.open(fileobj=hashing or stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.partition(".")
                    if current is not None and current["__key__"] != key:
                        seen += 1
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url}
                    current[ext] = tar.extractfile(member).read()
            if hashing is not None:
                while hashing.read(1 << 20):  # the rest of the stream (tar padding) belongs to the hash
                    pass
    except (tarfile.TarError, EOFError, OSError) as exn:
        where = f"after key {current['__key__']}" if current else "at the start"
        raise DataError(f"{url}: corrupt or truncated tar {where} ({exn})") from exn
    seen += current is not None
    if expected is not None and seen != expected:
        last = f"key {current['__key__']}" if current else "the start"
        raise DataError(f"{url}: corrupt or truncated tar: it ends at {last} with {seen} of {expected} samples")
    if hashing is not None and hashing.digest.hexdigest() != sha256:
        raise DataError(f"{url}: its sha256 differs from the manifest's: the shard changed after prepare")
    if current is not None:  # held back until the count is known good: it may be cut short
        yield current


def decode(
    sample: dict, payload: str, image_shape: tuple[int, int, int], num_classes: int | None, n_bins: int = 256
) -> tuple[np.ndarray, int, int]:
    """``(image (C, H, W) uint8, label or -1, index)`` of a raw sample, checked against the manifest.

    Pixel values must be grey levels of the data set (``0..n_bins-1``): a value outside would be
    silently clipped or mis-binned by dequantization.
    """
    where = f"{sample['__url__']} key {sample['__key__']}"
    try:
        index = int(sample["__key__"])
    except ValueError as exn:
        raise DataError(f"{where}: key is not a sample index") from exn
    if payload not in sample:
        raise DataError(
            f"{where}: no .{payload} payload (has {', '.join(k for k in sample if not k.startswith('__'))})"
        )
    try:
        if payload == "npy":
            image = np.load(io.BytesIO(sample[payload]), allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(io.BytesIO(sample[payload])) as img:
                image = np.asarray(img)
    except Exception as exn:  # PIL and numpy raise many types for bad bytes
        raise DataError(f"{where}: undecodable image ({exn})") from exn
    if image.ndim == 2:
        image = image[:, :, None]  # (H, W) -> (H, W, 1)
    found = (image.shape[2], image.shape[0], image.shape[1]) if image.ndim == 3 else tuple(image.shape)
    if image.dtype != np.uint8 or found != tuple(image_shape):
        raise DataError(f"{where}: image is {image.dtype} {found}, the manifest says uint8 {tuple(image_shape)}")
    if n_bins < 256 and int(image.max()) >= n_bins:
        raise DataError(
            f"{where}: pixel value {int(image.max())} is outside 0..{n_bins - 1}, the manifest's {n_bins} grey levels"
        )
    label = -1
    if "cls" in sample:
        try:
            label = int(sample["cls"].decode())
        except ValueError as exn:
            raise DataError(f"{where}: label {sample['cls']!r} is not an integer") from exn
        if num_classes is not None and not 0 <= label < num_classes:
            raise DataError(f"{where}: label {label} is out of range for {num_classes} classes")
    elif num_classes is not None:
        raise DataError(f"{where}: no label, but the manifest has {num_classes} classes")
    return np.ascontiguousarray(image.transpose(2, 0, 1)), label, index  # (H, W, C) -> (C, H, W)


def _shift_repeating_border(image: np.ndarray, d: int, axis: int) -> np.ndarray:
    """``out[i] = image[clip(i + d, 0, n - 1)]`` along ``axis``: the window at offset ``d`` of the
    image padded by repeating its border, written with two slice copies (``|d| < n``)."""
    if d == 0:
        return image
    n = image.shape[axis]
    out = np.empty(image.shape, image.dtype)

    def at(index: slice) -> tuple[slice, ...]:
        return (slice(None),) * axis + (index,)

    if d > 0:
        out[at(slice(0, n - d))] = image[at(slice(d, n))]
        out[at(slice(n - d, n))] = image[at(slice(n - 1, n))]  # the last row or column, repeated
    else:
        out[at(slice(-d, n))] = image[at(slice(0, n + d))]
        out[at(slice(0, -d))] = image[at(slice(0, 1))]  # the first row or column, repeated
    return out


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation on uint8 images: horizontal flips and the Glow paper's random shifts.

    ``max_shift`` is the largest shift in pixels along each axis; the image is padded by repeating
    its border, as the reference code's Keras ``ImageDataGenerator(width_shift_range=...)`` does.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    hflip: bool = False
    max_shift: int = 0

    def draw(self, rng: random.Random) -> tuple[bool, int, int]:
        """The random choices for one image: (flip, dy, dx). Drawn even when an image is skipped on
        resume, so the generator stays in step with an uninterrupted run."""
        flip = self.hflip and rng.random() < 0.5
        s = self.max_shift
        return (flip, rng.randint(-s, s), rng.randint(-s, s)) if s else (flip, 0, 0)

    def apply(self, image: np.ndarray, choice: tuple[bool, int, int]) -> np.ndarray:
        flip, dy, dx = choice
        if flip:
            image = image[:, :, ::-1]
        if self.max_shift:
            image = _shift_repeating_border(_shift_repeating_border(image, dy, axis=1), dx, axis=2)
        return np.ascontiguousarray(image)

    def __call__(self, image: np.ndarray, rng: random.Random) -> np.ndarray:
        return self.apply(image, self.draw(rng))


class ShardStream(IterableDataset):
    """Batches ``(levels uint8 (B, C, H, W), labels int64 (B,), indices int64 (B,))`` from shards.

    ``train=True``: endless reshuffled passes with a shuffle buffer, cut into epochs of
    ``batches_per_epoch`` batches per rank (summed over its workers), last partial batches dropped.
    ``train=False``: one ordered pass, each sample exactly once over all ranks and workers. Bad
    samples raise :class:`DataError` (``bad_samples="error"``) or are skipped, warned about and
    counted in ``skipped`` (``"skip"``). ``n_bits`` keeps the top bits of 256-level data.
    ``cache_mib`` keeps up to that many MiB of this process's shards in memory, their samples'
    bytes and, once decoded, their images: later passes then read no tar and decode no image.
    What a pass yields, skips and reports is the same with and without the cache.

    References: Aizman et al., "High Performance I/O For Large Scale Deep Learning" (WebDataset), 2019.
    """

    def __init__(
        self,
        urls: list[str],
        counts: list[int],
        manifest: dict,
        batch_size: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        batches_per_epoch: int | None = None,
        augment: Augment | None = None,
        n_bits: int | None = None,
        bad_samples: str = "error",
        skipped: multiprocessing.sharedctypes.Synchronized | None = None,
        verify: bool = True,
        cache_mib: float = 0,
    ) -> None:
        super().__init__()
        if bad_samples not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"bad_samples={bad_samples!r}: choose one of {', '.join(BAD_SAMPLE_POLICIES)}")
        if not (math.isfinite(cache_mib) and cache_mib >= 0):
            raise ValueError(f"cache_mib={cache_mib} must be a finite number >= 0 (0: no cache)")
        self.urls, self.counts = list(urls), list(counts)
        self.payload = manifest["payload"]
        self.image_shape = tuple(manifest["image_shape"])
        self.num_classes = manifest.get("num_classes")
        self.n_bins = int(manifest["n_bins"])
        # Each shard's sha256 by file name, checked once per process when ``verify``.
        shas = {s["name"]: s["sha256"] for split in manifest["splits"].values() for s in split["shards"]}
        self.sha256 = [shas.get(url.rsplit("/", 1)[-1]) if verify else None for url in self.urls]
        self.batch_size, self.train = batch_size, train
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.augment, self.n_bits, self.bad_samples = augment, n_bits, bad_samples
        self.skipped = skipped
        self.slots = world_size * max(1, num_workers)
        self.batches_per_epoch = batches_per_epoch
        self.skip_epochs = 0  # whole epochs each worker passes over when a run resumes
        self._stream: Iterator | None = None
        # This process's fully read shards (by index): their samples (of this slot) in order.
        self._cache: dict[int, list[dict]] = {}
        self._cache_left = int(cache_mib * 2**20)
        self._decoded_bytes = math.prod(self.image_shape)

    # Which shards and samples a slot reads in a pass.
    def _assignment(self, slot: int, shard_order: list[int]) -> tuple[list[int], int | None]:
        if len(shard_order) >= self.slots:
            return shard_order[slot :: self.slots], None
        return shard_order, slot

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return self.rank * max(1, self.num_workers) + worker, worker

    def _raw(self, slot: int, shard_order: list[int]) -> Iterator[dict]:
        """Undecoded samples of this slot's share of one pass over ``shard_order``."""
        shards, sample_slot = self._assignment(slot, shard_order)
        for s in shards:
            if s in self._cache:
                yield from self._cache[s]
                continue
            kept: list[dict] | None = [] if self._cache_left > 0 else None
            size = 0
            try:
                for raw in iter_tar(self.urls[s], self.counts[s], self.sha256[s]):
                    if sample_slot is None or int(raw["__key__"]) % self.slots == sample_slot:
                        if kept is not None:
                            size += self._footprint(raw)
                            if size > self._cache_left:
                                kept = None  # the shard does not fit: read it again next pass
                            else:
                                kept.append(raw)
                        yield raw
            except DataError as exn:
                self._bad(exn)
                continue  # a damaged shard is read (and reported) again on every pass, as without a cache
            if kept is not None:
                self._cache[s] = kept
                self._cache_left -= size

    def _footprint(self, raw: dict) -> int:
        """Bytes a cached sample holds: its payloads, its decoded image and (roughly) the Python objects."""
        payloads = sum(len(value) for key, value in raw.items() if not key.startswith("__"))
        return payloads + self._decoded_bytes + 512

    def _decoded(self, raw: dict) -> tuple[np.ndarray, int, int] | None:
        """The decoded sample, or None after reporting a bad one. The outcome is kept in ``raw``, so
        a cached sample is decoded once; a bad one is reported on every pass, as without a cache."""
        outcome = raw.get("__decoded__")
        if outcome is None:
            try:
                outcome = decode(raw, self.payload, self.image_shape, self.num_classes, self.n_bins)
                outcome[0].flags.writeable = False  # shared by every pass that yields the sample
            except DataError as exn:
                outcome = exn
            raw["__decoded__"] = outcome
        if isinstance(outcome, DataError):
            self._bad(outcome)
            return None
        return outcome

    def _samples(self, slot: int, shard_order: list[int]) -> Iterator[tuple[np.ndarray, int, int]]:
        for raw in self._raw(slot, shard_order):
            sample = self._decoded(raw)
            if sample is not None:
                yield sample

    def _bad(self, exn: DataError) -> None:
        if self.bad_samples == "error":
            raise exn
        if self.skipped is not None:
            with self.skipped.get_lock():
                self.skipped.value += 1
        warnings.warn(f"skipped: {exn}", stacklevel=2)

    def _batches(
        self, samples: Iterator[tuple[np.ndarray, int, int]], drop_last: bool
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        batch: list[tuple[np.ndarray, int, int]] = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._collate(batch)
                batch = []
        if batch and not drop_last:
            yield self._collate(batch)

    def _collate(self, batch: list[tuple[np.ndarray, int, int]]) -> tuple[torch.Tensor, ...]:
        levels = torch.from_numpy(np.stack([b[0] for b in batch]))  # (B, C, H, W)
        if self.n_bits is not None:
            levels = reduce_bits(levels, self.n_bits)
        return levels, torch.tensor([b[1] for b in batch]), torch.tensor([b[2] for b in batch])

    def _train_samples(self, slot: int, worker: int, skip: int) -> Iterator[tuple[np.ndarray, int, int]]:
        """Endless shuffled samples; the first ``skip`` are passed over without decoding (resume).

        The shuffle buffer holds undecoded bytes and every random choice is drawn whether or not
        the sample is skipped, so a resumed stream continues exactly where the interrupted one was.
        """
        rng = random.Random(f"{self.seed}/{self.rank}/{worker}")
        buffer: list[dict] = []
        epoch = 0
        while True:
            order = list(range(len(self.urls)))
            random.Random(f"{self.seed}/pass{epoch}").shuffle(order)  # the same on every rank
            got = False
            for raw in self._raw(slot, order):
                got = True
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(raw)
                    continue
                j = rng.randrange(len(buffer))
                raw, buffer[j] = buffer[j], raw
                choice = self.augment.draw(rng) if self.augment is not None else None
                if skip > 0:
                    skip -= 1
                    continue
                sample = self._decoded(raw)
                if sample is not None:
                    image = sample[0] if choice is None else self.augment.apply(sample[0], choice)
                    yield image, sample[1], sample[2]
            if not got and not buffer:
                raise DataError(
                    f"no training samples could be read from {len(self.urls)} shards (first: {self.urls[0]})"
                )
            epoch += 1

    def worker_batches(self) -> int:
        """Batches one worker yields per training epoch; the rank's total is the same on every rank."""
        return math.ceil(self.batches_per_epoch / max(1, self.num_workers))

    def eval_samples_of_slot(self, slot: int) -> int:
        """Samples that reader slot ``slot`` sees in an evaluation pass (from the manifest counts)."""
        order = list(range(len(self.urls)))
        shards, sample_slot = self._assignment(slot, order)
        if sample_slot is None:
            return sum(self.counts[s] for s in shards)
        total = sum(self.counts)
        return len(range(sample_slot, total, self.slots))

    def __len__(self) -> int:
        workers = max(1, self.num_workers)
        if self.train:
            return workers * self.worker_batches()
        slots = range(self.rank * workers, (self.rank + 1) * workers)
        return sum(math.ceil(self.eval_samples_of_slot(s) / self.batch_size) for s in slots)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        slot, worker = self._slot()
        if not self.train:
            yield from self._batches(self._samples(slot, list(range(len(self.urls)))), drop_last=False)
            return
        # The stream persists across epochs (in the worker, with persistent workers), so each epoch
        # continues where the last one stopped instead of restarting at the first shard.
        if self._stream is None:
            skip = self.skip_epochs * self.worker_batches() * self.batch_size
            self._stream = self._batches(self._train_samples(slot, worker, skip), drop_last=True)
        for _ in range(self.worker_batches()):
            yield next(self._stream)


@dataclass
class Samples:
    """Chosen samples of a split: uint8 levels (N, C, H, W), labels (-1 if none), attributes (N, A)."""

    levels: torch.Tensor
    labels: torch.Tensor
    attributes: torch.Tensor | None
    indices: torch.Tensor


def read_samples(root: str, split: str, indices: list[int] | None = None, limit: int | None = None) -> Samples:
    """Samples of ``split`` by index (``indices``, in that order) or the first ``limit`` of them.

    Only the shards holding the wanted samples are opened.
    """
    manifest = read_manifest(root)
    urls = shard_urls(root, manifest, split)
    counts = shard_counts(manifest, split)
    total = sum(counts)
    wanted = list(range(min(limit, total))) if indices is None else [int(i) for i in indices]
    bad = [i for i in wanted if not 0 <= i < total]
    if bad:
        raise DataError(f"{root}: the {split} split has {total} images; no index {bad[0]}")
    starts = np.cumsum([0, *counts])
    found: dict[int, tuple] = {}
    for s, url in enumerate(urls):
        need = {i for i in wanted if starts[s] <= i < starts[s + 1]}
        if not need:
            continue
        sha256 = manifest["splits"][split]["shards"][s]["sha256"]
        for raw in iter_tar(url, counts[s], sha256):
            index = int(raw["__key__"])
            if index in need:
                image, label, _ = decode(
                    raw,
                    manifest["payload"],
                    tuple(manifest["image_shape"]),
                    manifest.get("num_classes"),
                    int(manifest["n_bins"]),
                )
                attrs = [int(c) for c in raw["attr"].decode()] if "attr" in raw else None
                found[index] = (image, label, attrs)
    rows = [found[i] for i in wanted]
    attributes = torch.tensor([r[2] for r in rows], dtype=torch.uint8) if rows and rows[0][2] is not None else None
    return Samples(
        torch.from_numpy(np.stack([r[0] for r in rows])),  # (N, C, H, W)
        torch.tensor([r[1] for r in rows]),
        attributes,
        torch.tensor(wanted),
    )
