"""``glowlab evaluate fid``: Frechet distance between generated and real images.

Features come from torchmetrics' FrechetInceptionDistance with the standard InceptionV3 (torch-fidelity
weights, read from a local file only), or from a classifier trained on the data set itself
(``features="classifier"``, for tiny images such as the digits). Real-image statistics are cached
per data set, split, quantization and feature extractor. Sampling is batched with a fixed seed per
batch, so ``parts`` processes (GPUs or array tasks) can each draw a share and ``merge_fid`` adds
their statistics.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid

from glowlab.data.prepare import sha256_of
from glowlab.files import write_atomic
from glowlab.jobs.classifier import CLASSIFIER_FILE, load_classifier, manifest_digest, to_uint8
from glowlab.likelihood import quantize
from glowlab.models import MultiscaleFlow

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
FEATURES = ("inception", "classifier")
STATE = ("features_sum", "features_cov_sum", "features_num_samples")


def inception_weights(path: str | Path | None = None) -> Path:
    """The local InceptionV3 weights file; a clear error (and no download attempt) if it is absent."""
    candidate = Path(path) if path else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not candidate.is_file():
        raise FileNotFoundError(
            f"InceptionV3 weights not found at {candidate}. FID needs torch-fidelity's {INCEPTION_FILE} "
            f"(the file its v0.2.0 release publishes); glowlab never downloads it. Copy it to {candidate} "
            f"(the torch hub cache, under $TORCH_HOME) or pass --inception-weights PATH; for tiny data sets "
            f"use --features classifier."
        )
    return candidate


class _ToRGB(nn.Module):
    """Grey images repeated to three channels for InceptionV3; RGB passes through."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: Tensor) -> Tensor:
        return self.inner(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images)


def make_metric(
    features: str, data_root: str, inception: str | Path | None = None, classifier: str | Path | None = None
) -> tuple[FrechetInceptionDistance, str]:
    """The metric with its feature extractor, and a fingerprint of that extractor for the cache."""
    if features == "inception":
        weights = inception_weights(inception)
        try:
            metric = FrechetInceptionDistance(
                feature=2048, feature_extractor_weights_path=str(weights), reset_real_features=False
            )
        except Exception as exn:  # torch.load and state_dict errors of many kinds for a wrong file
            raise ValueError(f"{weights}: not torch-fidelity's InceptionV3 weights {INCEPTION_FILE} ({exn})") from exn
        metric.inception = _ToRGB(metric.inception)
        return metric, f"inception-{sha256_of(weights)[:12]}"
    if features == "classifier":
        path = Path(classifier) if classifier else Path(data_root) / CLASSIFIER_FILE
        model, record = load_classifier(path)
        if record["data"] != manifest_digest(data_root):
            raise ValueError(f"{path} was trained on other data than {data_root}; retrain it")
        return FrechetInceptionDistance(feature=model, reset_real_features=False), f"classifier-{sha256_of(path)[:12]}"
    raise ValueError(f"--features {features!r}: choose one of {', '.join(FEATURES)}")


def _stats(metric: FrechetInceptionDistance, side: str) -> dict[str, Tensor]:
    return {name: getattr(metric, f"{side}_{name}").detach().cpu().clone() for name in STATE}


def _set_stats(metric: FrechetInceptionDistance, side: str, stats: dict[str, Tensor]) -> None:
    for name in STATE:
        setattr(metric, f"{side}_{name}", stats[name].to(getattr(metric, f"{side}_{name}")))


def real_statistics(
    metric: FrechetInceptionDistance,
    extractor: str,
    data_root: str,
    split: str,
    n_bins: int,
    batch_size: int,
    cache_dir: str | Path,
    limit: int | None = None,
) -> Path:
    """Fill the metric's real-image statistics from the cache, computing and caching them if needed."""
    from glowlab.data.shards import ShardStream, read_manifest, shard_counts, shard_urls

    key = f"{manifest_digest(data_root)}-{split}-{n_bins}bins-{extractor}-{limit or 'all'}"
    path = Path(cache_dir) / f"{key}.pt"
    if path.is_file():
        _set_stats(metric, "real", torch.load(path, weights_only=True))
        return path
    manifest = read_manifest(data_root)
    n_bits = None if n_bins == manifest["n_bins"] else n_bins.bit_length() - 1
    counts = shard_counts(manifest, split)
    stream = ShardStream(
        shard_urls(data_root, manifest, split), counts, manifest, batch_size, train=False, n_bits=n_bits
    )
    seen = 0
    for levels, _, _ in stream:
        if limit is not None:
            levels = levels[: limit - seen]
        metric.update(to_uint8(levels, n_bins), real=True)
        seen += len(levels)
        if limit is not None and seen >= limit:
            break
    stats = _stats(metric, "real")
    write_atomic(path, lambda f: torch.save(stats, f))
    return path


def generated_statistics(
    metric: FrechetInceptionDistance,
    model: MultiscaleFlow,
    num_samples: int,
    temperature: float,
    batch_size: int,
    seed: int = 0,
    part: int = 0,
    parts: int = 1,
    progress: bool = True,
) -> int:
    """Add the features of this part's samples; batch ``b`` (seeded by ``seed, b``) belongs to part ``b % parts``."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    batches = [b for b in range(-(-num_samples // batch_size)) if b % parts == part]
    drawn = 0
    for b in tqdm(batches, desc=f"FID samples (part {part + 1}/{parts})", disable=not progress):
        n = min(batch_size, num_samples - b * batch_size)
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
        y = None
        if model.num_classes:
            y = torch.randint(model.num_classes, (n,), generator=generator, device=device)
        with torch.no_grad():
            x = model.decode(model.sample_latents(n, temperature, generator), y)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"samples of batch {b} at T={temperature} are not finite: the model is broken; no FID")
        metric.update(to_uint8(quantize(x, model.n_bins), model.n_bins).cpu(), real=False)
        drawn += n
    return drawn


def fid_from_stats(real: dict[str, Tensor], fake: dict[str, Tensor]) -> float:
    """FID from accumulated feature sums, sums of outer products and counts (torchmetrics' states)."""

    def mean_cov(stats: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        n = stats["features_num_samples"].double()
        mean = stats["features_sum"].double() / n
        cov = (stats["features_cov_sum"].double() - n * torch.outer(mean, mean)) / (n - 1)
        return mean, cov

    if min(int(real["features_num_samples"]), int(fake["features_num_samples"])) < 2:
        raise ValueError("FID needs at least 2 real and 2 generated images")
    for side, stats in (("real", real), ("generated", fake)):
        if not all(bool(torch.isfinite(v).all()) for v in stats.values()):
            raise ValueError(f"the {side} images' features are not finite: no FID")
    fid = float(_compute_fid(*mean_cov(real), *mean_cov(fake)))
    if not math.isfinite(fid):
        raise ValueError(f"FID came out as {fid}: the feature statistics are degenerate")
    return fid


def evaluate_fid(
    *,
    ckpt: str,
    data_root: str,
    num_samples: int = 10000,
    temperature: float = 1.0,
    split: str = "train",
    features: str = "inception",
    inception_weights_path: str | None = None,
    classifier: str | None = None,
    batch_size: int = 100,
    seed: int = 0,
    part: int = 0,
    parts: int = 1,
    real_limit: int | None = None,
    cache_dir: str | Path | None = None,
    out: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """FID of ``num_samples`` samples of ``ckpt`` against ``split``.

    With ``parts > 1`` this writes only this part's statistics, for :func:`merge_fid`.
    """
    from glowlab.files import write_json
    from glowlab.jobs.common import check_data, load_image_model

    if not 0 <= part < parts:
        raise ValueError(f"--part {part} must be in 0..{parts - 1}")
    metric, extractor = make_metric(features, data_root, inception_weights_path, classifier)  # weights first: fail fast
    model = load_image_model(ckpt, device)
    check_data(model, ckpt, data_root)
    cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "glowlab" / "fid"
    cache = real_statistics(metric, extractor, data_root, split, model.n_bins, batch_size, cache_dir, real_limit)
    drawn = generated_statistics(
        metric, model, num_samples, temperature, batch_size, seed=seed, part=part, parts=parts, progress=progress
    )
    info = {
        "checkpoint": str(ckpt),
        "data": data_root,
        "split": split,
        "features": extractor,
        "temperature": temperature,
        "num_samples": num_samples,
        "seed": seed,
        "real_images": int(metric.real_features_num_samples),
        "real_statistics": str(cache),
    }
    if parts > 1:
        record = {**info, "part": part, "parts": parts, "drawn": drawn, "fake": _stats(metric, "fake")}
        path = Path(out or f"fid-part{part}-of{parts}.pt")
        write_atomic(path, lambda f: torch.save(record, f))
        print(f"FID part {part + 1}/{parts}: statistics of {drawn} samples -> {path}")
        return {**info, "part": part, "parts": parts, "drawn": drawn, "path": str(path)}
    results = {**info, "fid": fid_from_stats(_stats(metric, "real"), _stats(metric, "fake"))}
    if out:
        write_json(out, results)
    print(
        f"FID {results['fid']:.3f} ({drawn} samples at T={temperature} vs {results['real_images']} {split} images, "
        f"{extractor})" + (f" -> {out}" if out else "")
    )
    return results


def merge_fid(part_files: list[str | Path], out: str | Path | None = None) -> dict:
    """Add the statistics of ``glowlab evaluate fid --parts N`` runs and compute the FID."""
    from glowlab.files import write_json

    records = []
    for p in part_files:
        try:
            record = torch.load(p, weights_only=True)
        except Exception as exn:  # not a torch file, truncated, or holding other objects
            raise ValueError(f"{p}: not a part of glowlab evaluate fid --parts ({exn})") from exn
        if not isinstance(record, dict) or not {"part", "parts", "fake"} <= set(record):
            raise ValueError(f"{p}: not a part of glowlab evaluate fid --parts (no part, parts and statistics)")
        records.append(record)
    first = records[0]
    for p, r in zip(part_files, records, strict=True):
        for key in (
            "checkpoint",
            "data",
            "split",
            "features",
            "temperature",
            "num_samples",
            "seed",
            "parts",
            "real_statistics",
        ):
            if r[key] != first[key]:
                raise ValueError(f"{p}: {key}={r[key]!r} differs from {part_files[0]}'s {first[key]!r}")
    found = sorted(r["part"] for r in records)
    if found != list(range(first["parts"])):
        raise ValueError(f"expected parts 0..{first['parts'] - 1}, got {found}")
    fake = {name: sum(r["fake"][name] for r in records) for name in STATE}
    real = torch.load(first["real_statistics"], weights_only=True)
    results = {k: first[k] for k in ("checkpoint", "data", "split", "features", "temperature", "num_samples", "seed")}
    results.update(fid=fid_from_stats(real, fake), real_images=int(real["features_num_samples"]), parts=first["parts"])
    if out:
        write_json(out, results)
    print(f"FID {results['fid']:.3f} from {len(records)} parts" + (f" -> {out}" if out else ""))
    return results
