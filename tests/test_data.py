"""Data pipeline: sources, `glowlab prepare`, shard reading, rank/worker splitting, bad input."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import prepared, prepared_digits, synthetic_npz
from PIL import Image

from glowlab.cli import main
from glowlab.data import DataError, PrepareOptions, ShardStream, load_source, prepare, read_manifest, shard_urls
from glowlab.data.prepare import split_order, transform
from glowlab.data.shards import Augment, iter_tar, shard_counts
from glowlab.training import ShardDataModule


def read_split(root: Path, split: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    manifest = read_manifest(str(root))
    urls = shard_urls(str(root), manifest, split)
    counts = shard_counts(manifest, split)
    stream = ShardStream(urls, counts, manifest, batch_size=7, train=False, **kwargs)
    batches = list(stream)
    assert len(batches) == len(stream)
    return tuple(torch.cat(parts) for parts in zip(*batches, strict=True))


# Sources ------------------------------------------------------------------------------------------


def test_digits_source() -> None:
    source = load_source("digits")
    assert len(source) == 1797 and source.n_bins == 17 and source.class_names == [str(d) for d in range(10)]
    image = source.image(0)
    assert image.shape == (8, 8, 1) and image.dtype == np.uint8 and image.max() <= 16


def test_npz_source_layouts_and_errors(tmp_path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 4, 3), dtype=np.uint8)  # (N, H, W, C)
    np.savez(tmp_path / "last.npz", images=images, labels=np.arange(5))
    np.savez(tmp_path / "first.npz", images=images.transpose(0, 3, 1, 2))
    a, b = load_source("npz", str(tmp_path / "last.npz")), load_source("npz", str(tmp_path / "first.npz"))
    assert np.array_equal(a.image(2), images[2]) and np.array_equal(b.image(2), images[2])
    assert a.labels.tolist() == list(range(5)) and b.labels is None
    bad = tmp_path / "bad.npz"
    with pytest.raises(FileNotFoundError, match=r"bad.npz"):
        load_source("npz", str(bad))
    np.savez(bad, pictures=images)
    with pytest.raises(KeyError, match=r"bad.npz: no 'images'"):
        load_source("npz", str(bad))
    floats = images.astype(np.float32)
    floats[0, 0, 0, 0] = np.nan
    np.savez(bad, images=floats)
    with pytest.raises(ValueError, match=r"bad.npz: 'images' holds float32 values; .* takes uint8"):
        load_source("npz", str(bad))
    np.savez(bad, images=np.zeros((0, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"bad.npz: 'images' holds no images"):
        load_source("npz", str(bad))
    bad.write_text("a text file, not a zip archive")
    with pytest.raises(ValueError, match=r"bad.npz: not a readable .npz archive"):
        load_source("npz", str(bad))
    np.savez(bad, images=images, labels=np.array([0, 1, -1, 0, 0]))
    with pytest.raises(ValueError, match=r"bad.npz: 'labels' has negative"):
        load_source("npz", str(bad))


def test_folder_source_classes_from_subfolders(tmp_path) -> None:
    for cls, color in (("cat", 10), ("dog", 200)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (5, 4), (color, i, 0)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    source = load_source("folder", str(tmp_path))
    assert len(source) == 6 and source.class_names == ["cat", "dog"] and source.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert source.image(4).shape == (4, 5, 3) and source.image(4)[0, 0].tolist() == [200, 1, 0]
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    source = load_source("folder", str(tmp_path))
    broken = next(i for i in range(len(source)) if "broken" in source.describe(i))
    with pytest.raises(ValueError, match=r"broken.png: cannot decode image"):
        source.image(broken)


def write_fake_cifar(root: Path, n_train: int = 10, n_test: int = 4) -> Path:
    """The CIFAR-10 python release's layout and pickle format, with random images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        data = {
            b"data": rng.integers(0, 256, (n_train // 5, 3072), dtype=np.uint8),
            b"labels": [i % 10] * (n_train // 5),
        }
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(data))
    test = {b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), b"labels": list(range(n_test))}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive


def test_cifar_source_keeps_the_official_split(tmp_path) -> None:
    archive = write_fake_cifar(tmp_path)
    from_archive, from_folder = load_source("cifar10", str(archive)), load_source("cifar10", str(tmp_path))
    assert len(from_archive) == 14 and from_archive.splits["test"].tolist() == [10, 11, 12, 13]
    assert np.array_equal(from_archive.image(12), from_folder.image(12))
    batch = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())
    assert np.array_equal(from_archive.image(12), batch[b"data"][2].reshape(3, 32, 32).transpose(1, 2, 0))
    assert from_archive.class_names[3] == "c3" and from_archive.labels[12] == 2
    manifest = prepare(from_archive, tmp_path / "out", PrepareOptions(val_fraction=0.2), progress=False)
    assert {k: v["count"] for k, v in manifest["splits"].items()} == {"train": 8, "val": 2, "test": 4}


def test_cifar_unpickler_refuses_code(tmp_path) -> None:
    folder = write_fake_cifar(tmp_path).parent / "cifar-10-batches-py"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(ValueError, match="refusing to load"):
        load_source("cifar10", str(tmp_path))


# Prepare ------------------------------------------------------------------------------------------


def test_round_trip_is_pixel_identical_with_labels(tmp_path) -> None:
    npz = synthetic_npz(tmp_path / "s.npz", 50, (3, 6, 6), num_classes=4)
    source = load_source("npz", str(npz))
    for payload in ("png", "npy"):
        out = tmp_path / payload
        manifest = prepare(source, out, PrepareOptions(shard_size=7, payload=payload, seed=3), progress=False)
        order = split_order(50, 0.1, 0.2, seed=3)
        assert {k: v["count"] for k, v in manifest["splits"].items()} == {k: len(v) for k, v in order.items()}
        assert manifest["image_shape"] == [3, 6, 6] and manifest["num_classes"] == 4 and manifest["n_bins"] == 256
        for split, idx in order.items():
            levels, labels, index = read_split(out, split)
            assert index.tolist() == list(range(len(idx)))
            expected = np.stack([source.image(i) for i in idx]).transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
            assert np.array_equal(levels.numpy(), expected)
            assert labels.tolist() == source.labels[idx].tolist()
        shards = manifest["splits"]["train"]["shards"]
        assert shard_counts(manifest, "train") == [7, 7, 7, 7, 7]  # 35 training images, shards of 7
        assert all(hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() == s["sha256"] for s in shards)


def test_digits_prepare_matches_the_split_and_levels(tmp_path) -> None:
    root = prepared_digits(tmp_path / "digits", shard_size=400)
    manifest = read_manifest(str(root))
    assert manifest["n_bins"] == 17 and manifest["num_classes"] == 10 and manifest["image_shape"] == [1, 8, 8]
    assert {k: v["count"] for k, v in manifest["splits"].items()} == {"train": 1258, "val": 180, "test": 359}
    levels, labels, _ = read_split(root, "test")
    source = load_source("digits")
    idx = split_order(1797, 0.1, 0.2, 0)["test"]
    assert (
        np.array_equal(levels.numpy()[:, 0], source.arrays[idx, :, :, 0])
        and labels.tolist() == source.labels[idx].tolist()
    )


def test_resize_and_centre_crop() -> None:
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, 10:50] = 255  # the centre 40x40 is white
    out = transform(image, 8, "box")
    assert out.shape == (8, 8, 3) and out.min() == 255
    grey = transform(np.full((16, 16, 1), 7, np.uint8), 4, "lanczos")
    assert grey.shape == (4, 4, 1) and np.all(grey == 7)


def test_workers_write_the_same_shards(tmp_path) -> None:
    npz = synthetic_npz(tmp_path / "s.npz", 60, (3, 4, 4))
    source = load_source("npz", str(npz))
    one = prepare(source, tmp_path / "one", PrepareOptions(shard_size=5), progress=False)
    two = prepare(source, tmp_path / "two", PrepareOptions(shard_size=5), workers=2, progress=False)
    assert one["splits"] == two["splits"]


def test_interrupted_prepare_resumes_and_never_looks_complete(tmp_path, monkeypatch) -> None:
    prep = importlib.import_module("glowlab.data.prepare")  # the module, not the function of that name

    source = load_source("npz", str(synthetic_npz(tmp_path / "s.npz", 40, (3, 4, 4))))
    out, options = tmp_path / "out", PrepareOptions(shard_size=4)
    reference = prepare(source, tmp_path / "ref", options, progress=False)
    real_encode, calls = prep.encode, {"n": 0}

    def failing_encode(image, payload):
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return real_encode(image, payload)

    monkeypatch.setattr(prep, "encode", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, out, options, progress=False)
    assert not (out / "manifest.json").exists()
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert len(finished) == 3 and list(out.glob("*.partial"))  # the interrupted shard is only a .partial
    with pytest.raises(DataError, match="manifest"):
        read_manifest(str(out))
    monkeypatch.setattr(prep, "encode", real_encode)
    before = {n: (out / n).stat().st_mtime_ns for n in finished}
    manifest = prepare(source, out, options, progress=False)
    assert manifest["splits"] == reference["splits"]
    assert all((out / n).stat().st_mtime_ns == t for n, t in before.items())  # finished shards were kept
    assert not list(out.glob("*.partial"))


def test_prepare_never_overwrites_silently(tmp_path) -> None:
    source = load_source("npz", str(synthetic_npz(tmp_path / "s.npz", 20, (3, 4, 4))))
    out = tmp_path / "out"
    prepare(source, out, PrepareOptions(shard_size=4), progress=False)
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare(source, out, PrepareOptions(shard_size=5), progress=False)
    manifest = prepare(source, out, PrepareOptions(shard_size=5), overwrite=True, progress=False)
    assert manifest["options"]["shard_size"] == 5 and (out / "mine.txt").read_text() == "keep me"
    assert not (out / "train-000003.tar").exists()  # the old run's extra shards are gone


def test_mixed_image_sizes_need_a_resolution(tmp_path) -> None:
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (8, 6)).save(tmp_path / "imgs" / "b.png")
    source = load_source("folder", str(tmp_path / "imgs"))
    with pytest.raises(ValueError, match=r"b.png: image is 6x8x3 .* pass --resolution"):
        prepare(source, tmp_path / "out", PrepareOptions(val_fraction=0, test_fraction=0), progress=False)
    manifest = prepare(
        source, tmp_path / "ok", PrepareOptions(resolution=4, val_fraction=0, test_fraction=0), progress=False
    )
    assert manifest["image_shape"] == [3, 4, 4]


def test_prepare_command(tmp_path, capsys) -> None:
    main(["prepare", "digits", "--out", str(tmp_path / "d"), "--quiet", "--shard-size", "1000"])
    assert "train 1258, val 180, test 359" in capsys.readouterr().out
    assert len(read_manifest(str(tmp_path / "d"))["splits"]["train"]["shards"]) == 2
    with pytest.raises(SystemExit):
        main(["prepare", "npz", "--quiet"])


# Reading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [1, 3])
@pytest.mark.parametrize("shard_size", [3, 50])  # many shards (shard-level split) and one (sample-level)
def test_eval_sees_every_sample_exactly_once_across_ranks_and_workers(tmp_path, shard_size, num_workers) -> None:
    root = prepared(tmp_path, n=45, shard_size=shard_size)
    total = read_manifest(str(root))["splits"]["train"]["count"]
    seen = []
    for rank in range(2):
        manifest = read_manifest(str(root))
        urls = shard_urls(str(root), manifest, "train")
        counts = shard_counts(manifest, "train")
        stream = ShardStream(urls, counts, manifest, 4, train=False, rank=rank, world_size=2, num_workers=num_workers)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
        batches = list(loader)
        assert len(batches) == len(stream)
        seen += torch.cat([b[2] for b in batches]).tolist()
    assert sorted(seen) == list(range(total))


def _train_indices(root: Path, rank: int, world: int, workers: int, epochs: int, batches: int) -> list[list[int]]:
    manifest = read_manifest(str(root))
    urls = shard_urls(str(root), manifest, "train")
    counts = shard_counts(manifest, "train")
    stream = ShardStream(
        urls,
        counts,
        manifest,
        4,
        train=True,
        rank=rank,
        world_size=world,
        num_workers=workers,
        shuffle_buffer=8,
        batches_per_epoch=batches,
    )
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0)
    out = []
    for _ in range(epochs):
        out.append(torch.cat([b[2] for b in loader]).tolist())
        assert len(out[-1]) == len(stream) * 4
    return out


def test_training_ranks_read_disjoint_shards_and_equal_batches(tmp_path) -> None:
    root = prepared(tmp_path, n=100, shard_size=5)  # 12 training shards
    shard_of = lambda i: i // 5  # noqa: E731 - shard k holds keys 5k..5k+4
    ranks = [_train_indices(root, r, world=2, workers=2, epochs=1, batches=3)[0] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2 * 2 * 4  # 2 workers x ceil(3/2) batches x 4 images
    assert not {shard_of(i) for i in ranks[0]} & {shard_of(i) for i in ranks[1]}
    assert len(set(ranks[0] + ranks[1])) == len(ranks[0] + ranks[1])


def test_training_epochs_continue_the_stream_and_reshuffle(tmp_path) -> None:
    root = prepared(tmp_path, n=100, shard_size=5)  # 60 training images, epochs of 5 batches x 4
    epochs = _train_indices(root, 0, world=1, workers=0, epochs=3, batches=5)
    # The second epoch continues the pass instead of restarting it: no image repeats within the
    # first 40 (they all come from the first pass's 60 images through an 8-image buffer).
    assert len(set(epochs[0] + epochs[1])) == 40
    assert epochs == _train_indices(root, 0, world=1, workers=0, epochs=3, batches=5)  # deterministic
    with_workers = _train_indices(root, 0, world=1, workers=2, epochs=2, batches=5)
    assert len(set(with_workers[0] + with_workers[1])) == len(with_workers[0] + with_workers[1])


def _train_stream(root: Path, cache_mib: float, **kwargs) -> ShardStream:
    manifest = read_manifest(str(root))
    urls, counts = shard_urls(str(root), manifest, "train"), shard_counts(manifest, "train")
    options = dict(shuffle_buffer=8, batches_per_epoch=5, augment=Augment(hflip=True, max_shift=1), seed=3)
    return ShardStream(urls, counts, manifest, 4, train=True, cache_mib=cache_mib, **{**options, **kwargs})


def _count_opened_shards(monkeypatch) -> list[str]:
    """The URLs the shard streams open from now on, one entry per opening."""
    import glowlab.data.shards as shards

    opened: list[str] = []

    def counting_iter_tar(url: str, *args, **kwargs):
        opened.append(url)
        return iter_tar(url, *args, **kwargs)

    monkeypatch.setattr(shards, "iter_tar", counting_iter_tar)
    return opened


def _epochs(stream: ShardStream, epochs: int) -> list[torch.Tensor]:
    return [torch.cat([torch.cat([b[0].flatten(), b[1], b[2]]) for b in stream]) for _ in range(epochs)]


@pytest.mark.parametrize(
    "layout",
    [
        dict(),  # whole shards
        dict(rank=1, world_size=13),  # more slots than the 12 shards: samples split by index
        dict(skip_epochs=2),  # a resumed run passes over two epochs without decoding them
    ],
    ids=["shards", "by-index", "resumed"],
)
def test_cached_stream_yields_the_batches_of_an_uncached_one_reading_each_shard_once(
    tmp_path, monkeypatch, layout: dict
) -> None:
    root = prepared(tmp_path, n=100, shard_size=5)  # 12 training shards, 60 images: an epoch is a third
    opened = _count_opened_shards(monkeypatch)
    streams = {}
    for cache in (0, 64):
        stream = _train_stream(root, cache, **{k: v for k, v in layout.items() if k != "skip_epochs"})
        stream.skip_epochs = layout.get("skip_epochs", 0)
        opened.clear()
        streams[cache] = (_epochs(stream, 9), len(opened))
    (uncached, opened_uncached), (cached, opened_cached) = streams[0], streams[64]
    assert all(torch.equal(a, b) for a, b in zip(uncached, cached, strict=True))
    assert opened_cached == 12  # each shard once ...
    assert opened_uncached > 3 * 12  # ... where the uncached stream reads them on every pass


def test_stream_cache_keeps_to_its_budget(tmp_path, monkeypatch) -> None:
    root = prepared(tmp_path, n=100, shard_size=5)
    opened = _count_opened_shards(monkeypatch)
    stream = _train_stream(root, 0)
    per_shard = sum(stream._footprint(raw) for raw in iter_tar(stream.urls[0]))
    stream = _train_stream(root, 2.5 * per_shard / 2**20)  # room for two shards, not three
    _epochs(stream, 6)  # two passes over the 60 images (and the start of a third: the shuffle buffer reads ahead)
    assert len(stream._cache) == 2
    assert stream._cache_left >= 0
    cached = {stream.urls[s] for s in stream._cache}
    assert all(opened.count(url) == 1 for url in cached)
    assert all(opened.count(url) >= 2 for url in set(stream.urls) - cached)


@pytest.mark.parametrize("cache_mib", [-1, float("nan"), float("inf")])
def test_cache_budget_must_be_a_finite_size(tmp_path, cache_mib: float) -> None:
    root = prepared(tmp_path, n=20, shard_size=50)
    with pytest.raises(ValueError, match=r"data.cache_mib=.* must be a finite number >= 0"):
        ShardDataModule(root=str(root), cache_mib=cache_mib)
    with pytest.raises(ValueError, match=r"cache_mib=.* must be a finite number >= 0"):
        _train_stream(root, cache_mib)


def test_cached_stream_reports_bad_samples_on_every_pass_as_an_uncached_one(tmp_path) -> None:
    root = prepared(tmp_path, n=40, shard_size=4, num_classes=3)  # val: keys 0-3 and 4-7 in two shards
    _rewrite_member(root / "val-000000.tar", "00000001.png", b"\x89PNG not really")
    _rewrite_member(root / "val-000000.tar", "00000003.cls", b"7")
    damaged = root / "val-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[:3000])  # cut inside its samples: a prefix, then an error
    for name in ("val-000000.tar", damaged.name):
        _fix_size(root, name)
    manifest = read_manifest(str(root))
    urls, counts = shard_urls(str(root), manifest, "val"), shard_counts(manifest, "val")
    results = []
    for cache in (0, 64):
        skipped = torch.multiprocessing.Value("q", 0)
        stream = ShardStream(
            urls, counts, manifest, 3, train=False, bad_samples="skip", skipped=skipped, verify=False, cache_mib=cache
        )
        with pytest.warns(UserWarning) as warned:
            passes = [torch.cat([b[2] for b in stream]).tolist() for _ in range(3)]
        results.append((passes, skipped.value, len(warned)))
    assert results[0] == results[1]
    passes, skipped, warnings = results[1]
    assert passes[0] == passes[1] == passes[2] and passes[0][:2] == [0, 2] and len(passes[0]) < 6
    assert skipped == warnings == 9  # 2 bad samples and a damaged shard, on each of 3 passes
    # Under the default policy a bad sample stops the run on any pass, from the cache too.
    stream = ShardStream(urls[:1], counts[:1], manifest, 3, train=False, verify=False, cache_mib=64)
    stream._cache[0] = list(iter_tar(urls[0]))
    with pytest.raises(DataError, match=r"key 00000001: undecodable image"):
        list(stream)


def test_augment_shift_is_the_shifted_window_of_the_edge_padded_image() -> None:
    import itertools

    image = np.random.default_rng(0).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    s = 3
    padded = np.pad(image, ((0, 0), (s, s), (s, s)), mode="edge")  # (C, H + 2s, W + 2s)
    for flip, dy, dx in itertools.product((False, True), range(-s, s + 1), range(-s, s + 1)):
        source = padded[:, :, ::-1] if flip else padded
        expected = source[:, s + dy : s + dy + 5, s + dx : s + dx + 7]
        out = Augment(hflip=True, max_shift=s).apply(image, (flip, dy, dx))
        assert np.array_equal(out, expected) and out.flags.c_contiguous, (flip, dy, dx)


def test_augment_flips_and_shifts() -> None:
    import random

    image = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    flipped = Augment(hflip=True)(image, random.Random(1))
    assert np.array_equal(flipped, image) or np.array_equal(flipped, image[:, :, ::-1])
    shifts = {Augment(max_shift=1)(image, random.Random(s)).tobytes() for s in range(40)}
    assert len(shifts) > 3  # different offsets
    shifted = Augment(max_shift=2)(image, random.Random(0))
    assert shifted.shape == image.shape and set(np.unique(shifted)) <= set(np.unique(image))


def test_datamodule_from_manifest(tmp_path) -> None:
    root = prepared_digits(tmp_path / "digits")
    dm = ShardDataModule(root=str(root), batch_size=32, eval_batch_size=100)
    assert dm.image_shape == (1, 8, 8) and dm.n_bins == 17 and dm.num_classes == 10
    levels, labels, index = next(iter(dm.train_dataloader()))
    assert levels.dtype == torch.uint8 and levels.shape == (32, 1, 8, 8) and levels.max() <= 16
    x, _y, _i, k = dm.on_after_batch_transfer((levels, labels, index), 0)
    assert torch.equal(k, levels)  # the integer images travel with their dequantization
    assert x.min() >= -0.5 and x.max() < 0.5 and torch.equal(torch.floor((x + 0.5) * 17).long(), levels.long())
    assert len(dm.train_dataloader()) == 1258 // 32
    # Evaluation noise is fixed per sample: the same images dequantize identically in any batch.
    batch = next(iter(dm.test_dataloader()))
    a = dm.on_after_batch_transfer(batch, 0)[0]
    b = dm.on_after_batch_transfer(tuple(t[5:9] for t in batch), 0)[0]
    assert torch.equal(a[5:9], b)
    with pytest.raises(ValueError, match=r"data.n_bits=5: .* stores 17 grey levels"):
        ShardDataModule(root=str(root), n_bits=5)


def test_datamodule_n_bits_reduction(tmp_path) -> None:
    root = prepared(tmp_path, n=20, shape=(3, 4, 4), n_bits_hint=5)
    dm = ShardDataModule(root=str(root), batch_size=4)
    assert dm.n_bins == 32
    levels = next(iter(dm.train_dataloader()))[0]
    assert levels.max() < 32
    assert ShardDataModule(root=str(root), n_bits=8).n_bins == 256


# Bad input ----------------------------------------------------------------------------------------


def test_missing_manifest_and_shard(tmp_path) -> None:
    with pytest.raises(DataError, match=r"nowhere/manifest.json: cannot read .*glowlab prepare"):
        ShardDataModule(root=str(tmp_path / "nowhere"))
    root = prepared(tmp_path, n=30)
    (root / "train-000001.tar").unlink()
    with pytest.raises(DataError, match=r"train-000001.tar: shard listed in the manifest is missing"):
        ShardDataModule(root=str(root)).train_dataloader()


def _rewrite_member(shard: Path, key_ext: str, data: bytes) -> None:
    """Replace one member's bytes, keeping the tar valid."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:
        for m, payload in members:
            payload = data if m.name == key_ext else payload
            m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))


def _fix_size(root: Path, name: str) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for s in split["shards"]:
            if s["name"] == name:
                s["size"] = (root / name).stat().st_size
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", r"val-000000.tar: corrupt or truncated tar"),
        ("garbage", r"val-000000.tar: corrupt or truncated tar"),
        ("undecodable", r"val-000000.tar key 00000001: undecodable image"),
        ("shape", r"val-000000.tar key 00000001: image is uint8 \(3, 4, 8\), the manifest says uint8 \(3, 8, 8\)"),
        ("label", r"val-000000.tar key 00000001: label 7 is out of range for 3 classes"),
    ],
)
def test_bad_input_is_an_error_naming_shard_and_key(tmp_path, damage: str, message: str) -> None:
    root = prepared(tmp_path, n=40, shard_size=50, num_classes=3)
    shard = root / "val-000000.tar"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:1500])
    elif damage == "garbage":
        data = bytearray(shard.read_bytes())
        data[600:1400] = os.urandom(800)
        shard.write_bytes(bytes(data))
    elif damage == "undecodable":
        _rewrite_member(shard, "00000001.png", b"\x89PNG not really")
    elif damage == "shape":
        buf = io.BytesIO()
        Image.new("RGB", (8, 4)).save(buf, format="PNG")
        _rewrite_member(shard, "00000001.png", buf.getvalue())
    else:
        _rewrite_member(shard, "00000001.cls", b"7")
    if damage != "truncate":
        _fix_size(root, shard.name)
    else:
        with pytest.raises(DataError, match=r"val-000000.tar: 1500 bytes, the manifest says"):
            ShardDataModule(root=str(root)).val_dataloader()
        _fix_size(root, shard.name)
    # The shard's sha256 no longer matches: refused before any sample is read.
    with pytest.raises(DataError, match=r"val-000000.tar: its sha256 is .*the shard changed after prepare"):
        list(ShardDataModule(root=str(root), eval_batch_size=4).val_dataloader())
    # Without the checksum (verify_shards off), the decoder's own checks name the shard and key.
    with pytest.raises(DataError, match=message):
        list(ShardDataModule(root=str(root), eval_batch_size=4, verify_shards=False).val_dataloader())
    # Opt-in: skip, warn and count; the good samples still arrive.
    dm = ShardDataModule(root=str(root), eval_batch_size=4, bad_samples="skip", verify_shards=False)
    with pytest.warns(UserWarning, match="skipped"):
        batches = list(dm.val_dataloader())
    assert dm.skipped_samples >= 1
    if damage in ("undecodable", "shape", "label"):
        assert dm.skipped_samples == 1 and sum(len(b[2]) for b in batches) == 7


def test_iter_tar_groups_members_by_key(tmp_path) -> None:
    root = prepared(tmp_path, n=10, shard_size=50)
    samples = list(iter_tar(str(root / "train-000000.tar")))
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(6)]
    assert all({"png", "cls"} <= set(s) for s in samples)
