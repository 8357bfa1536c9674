"""``glowlab evaluate fid``: Frechet distance between generated and real images.

Features come from torchmetrics' FrechetInceptionDistance with the standard InceptionV3 (torch-fidelity
weights, read from a local file only), or from a classifier trained on the data set itself
(``features="classifier"``, for tiny images such as the digits). Real-image statistics are cached
per data set, split, quantization and feature extractor. Sampling is batched with a fixed seed per
batch, so ``parts`` processes (GPUs or array tasks) can each draw a share and ``merge_fid`` adds
their statistics.

An FID alone cannot be judged: its scale depends on the features (two trainings of the digits'
classifier gave FIDs a factor of two apart) and it falls as the sample count grows. So every result carries the identity
of the feature extractor and a real-vs-real reference: held-out real images (the test split, else
val) against the same real statistics, at ``reference_size`` = min(samples, held-out images), next
to the model's FID on its first ``reference_size`` samples, which is the number to compare it with.
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
from glowlab.models import ImageFlow

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
) -> tuple[FrechetInceptionDistance, dict]:
    """The metric with its feature extractor, and that extractor's identity.

    The identity names the weights file and its sha256 (``name``, which keys the statistics cache,
    holds the first 12 hex digits); for a classifier also its recorded val accuracy, seed, epochs
    and data manifest digest (seed and epochs are None for files written before they were saved).
    """
    if features == "inception":
        weights = inception_weights(inception)
        try:
            metric = FrechetInceptionDistance(
                feature=2048, feature_extractor_weights_path=str(weights), reset_real_features=False
            )
        except Exception as exn:  # torch.load and state_dict errors of many kinds for a wrong file
            raise ValueError(f"{weights}: not torch-fidelity's InceptionV3 weights {INCEPTION_FILE} ({exn})") from exn
        metric.inception = _ToRGB(metric.inception)
        digest = sha256_of(weights)
        identity = {"name": f"inception-{digest[:12]}", "kind": "inception", "path": str(weights)}
        return metric, {**identity, "size_bytes": weights.stat().st_size, "sha256": digest}
    if features == "classifier":
        path = Path(classifier) if classifier else Path(data_root) / CLASSIFIER_FILE
        model, record = load_classifier(path)
        if record["data"] != manifest_digest(data_root):
            raise ValueError(f"{path} was trained on other data than {data_root}; retrain it")
        digest = sha256_of(path)
        accuracy = record.get("val_accuracy")
        identity = {
            "name": f"classifier-{digest[:12]}",
            "kind": "classifier",
            "path": str(path),
            "sha256": digest,
            # NaN (no val images) is not JSON; None says the same.
            "val_accuracy": accuracy if accuracy is not None and math.isfinite(accuracy) else None,
            "seed": record.get("seed"),
            "epochs": record.get("epochs"),
            "data": record["data"],
        }
        return FrechetInceptionDistance(feature=model, reset_real_features=False), identity
    raise ValueError(f"--features {features!r}: choose one of {', '.join(FEATURES)}")


def describe_extractor(identity: dict) -> str:
    """One phrase for the printed result: the extractor's name and, for a classifier, what it was."""
    if identity["kind"] != "classifier":
        return identity["name"]
    accuracy = identity["val_accuracy"]
    facts = [
        f"val accuracy {accuracy:.3f}" if accuracy is not None else "val accuracy unknown",
        f"seed {identity['seed']}" if identity["seed"] is not None else "seed unknown",
        f"{identity['epochs']} epochs" if identity["epochs"] is not None else "epochs unknown",
    ]
    return f"{identity['name']} ({', '.join(facts)})"


def _stats(metric: FrechetInceptionDistance, side: str) -> dict[str, Tensor]:
    return {name: getattr(metric, f"{side}_{name}").detach().cpu().clone() for name in STATE}


def _set_stats(metric: FrechetInceptionDistance, side: str, stats: dict[str, Tensor]) -> None:
    for name in STATE:
        setattr(metric, f"{side}_{name}", stats[name].to(getattr(metric, f"{side}_{name}")))


def held_out_split(manifest: dict, split: str) -> str | None:
    """The split a real-vs-real reference draws from: test, else val; never ``split`` itself.

    None when neither has the 2 images a covariance needs.
    """
    for name in ("test", "val"):
        if name != split and int(manifest["splits"].get(name, {}).get("count", 0)) >= 2:
            return name
    return None


def split_statistics(
    metric: FrechetInceptionDistance,
    extractor: str,
    data_root: str,
    split: str,
    n_bins: int,
    batch_size: int,
    cache_dir: str | Path,
    limit: int | None = None,
) -> tuple[dict[str, Tensor], Path]:
    """Feature statistics of the first ``limit`` (default all) images of ``split``, and their cache file.

    Read from the cache, or computed and cached. The metric's real side is the scratch space: it
    holds these statistics afterwards.
    """
    from glowlab.data.shards import ShardStream, read_manifest, shard_counts, shard_urls

    key = f"{manifest_digest(data_root)}-{split}-{n_bins}bins-{extractor}-{limit or 'all'}"
    path = Path(cache_dir) / f"{key}.pt"
    if path.is_file():
        stats = torch.load(path, weights_only=True)
        _set_stats(metric, "real", stats)
        return stats, path
    _set_stats(metric, "real", {name: torch.zeros_like(getattr(metric, f"real_{name}")) for name in STATE})
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
    return stats, path


def generated_statistics(
    metric: FrechetInceptionDistance,
    model: ImageFlow,
    num_samples: int,
    temperature: float,
    batch_size: int,
    seed: int = 0,
    part: int = 0,
    parts: int = 1,
    progress: bool = True,
    head: int = 0,
    guidance: float = 0.0,
) -> tuple[int, dict[str, Tensor]]:
    """Add the features of this part's samples; batch ``b`` (seeded by ``seed, b``) belongs to part ``b % parts``.

    Returns the number drawn and this part's share of the statistics of the first ``head`` samples
    (those numbered below ``head`` in the whole run, whichever part draws them), taken on the way.
    """
    from tqdm import tqdm

    device = next(model.parameters()).device
    batches = [b for b in range(-(-num_samples // batch_size)) if b % parts == part]
    drawn = 0
    head_stats = None
    for b in tqdm(batches, desc=f"FID samples (part {part + 1}/{parts})", disable=not progress):
        start = b * batch_size
        n = min(batch_size, num_samples - start)
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
        y = None
        if model.num_classes:
            y = torch.randint(model.num_classes, (n,), generator=generator, device=device)
        with torch.no_grad():
            x = model.decode_samples(model.sample_latents(n, temperature, generator), y, guidance)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"samples of batch {b} at T={temperature} are not finite: the model is broken; no FID")
        images = to_uint8(quantize(x, model.n_bins), model.n_bins).cpu()
        # A batch's samples depend on its size, so the head cannot be drawn on its own: the batch
        # holding sample ``head`` goes in as two updates, and the sums are read between them.
        k = min(max(head - start, 0), n)
        if k > 0:
            metric.update(images[:k], real=False)
        if head_stats is None and start + n >= head:
            head_stats = _stats(metric, "fake")
        if k < n:
            metric.update(images[k:], real=False)
        drawn += n
    return drawn, head_stats if head_stats is not None else _stats(metric, "fake")


def fid_from_stats(real: dict[str, Tensor], fake: dict[str, Tensor]) -> float:
    """FID from accumulated feature sums, sums of outer products and counts (torchmetrics' states).

    References: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
    Nash Equilibrium" (FID), NeurIPS 2017.
    """

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
    guidance: float = 0.0,
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
    """FID of ``num_samples`` samples of ``ckpt`` against ``split``, with a real-vs-real reference.

    ``fid`` uses all samples. FID is biased upwards by few samples, so the reference is taken at
    one size: ``reference_fid`` compares ``reference_size`` = min(``num_samples``, held-out images)
    images of the held-out split ``reference_split`` with the same real statistics, and
    ``fid_at_reference_size`` the model's first ``reference_size`` samples. ``feature_extractor``
    identifies the features. With ``parts > 1`` this writes only this part's statistics, for
    :func:`merge_fid`.

    References: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
    Nash Equilibrium" (FID), NeurIPS 2017; Chong & Forsyth, "Effectively Unbiased FID and
    Inception Score and Where to Find Them" (the sample-count bias), CVPR 2020.
    """
    from glowlab.data.shards import read_manifest
    from glowlab.files import write_json
    from glowlab.jobs.common import check_data, load_image_model

    if not 0 <= part < parts:
        raise ValueError(f"--part {part} must be in 0..{parts - 1}")
    metric, identity = make_metric(features, data_root, inception_weights_path, classifier)  # weights first: fail fast
    extractor = identity["name"]
    model = load_image_model(ckpt, device)
    check_data(model, ckpt, data_root)
    cache_dir = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "glowlab" / "fid"
    real, cache = split_statistics(metric, extractor, data_root, split, model.n_bins, batch_size, cache_dir, real_limit)
    manifest = read_manifest(data_root)
    held_out = held_out_split(manifest, split)
    reference_size, reference_cache = None, None
    if held_out is not None:
        # Both sides of the reference at one size, as FID falls with the sample count.
        reference_size = min(num_samples, int(manifest["splits"][held_out]["count"]))
        _, reference_cache = split_statistics(
            metric, extractor, data_root, held_out, model.n_bins, batch_size, cache_dir, reference_size
        )
    drawn, head = generated_statistics(
        metric,
        model,
        num_samples,
        temperature,
        batch_size,
        seed=seed,
        part=part,
        parts=parts,
        progress=progress,
        head=reference_size or 0,
        guidance=guidance,
    )
    info = {
        "checkpoint": str(ckpt),
        "data": data_root,
        "split": split,
        "features": extractor,
        "feature_extractor": {k: v for k, v in identity.items() if k != "name"},
        "temperature": temperature,
        "guidance": guidance,
        "weights": getattr(model, "weights", "trained"),
        "num_samples": num_samples,
        "seed": seed,
        "real_images": int(real["features_num_samples"]),
        "real_statistics": str(cache),
        "reference_split": held_out,
        "reference_size": reference_size,
        "reference_statistics": str(reference_cache) if reference_cache else None,
    }
    if parts > 1:
        record = {**info, "part": part, "parts": parts, "drawn": drawn, "fake": _stats(metric, "fake"), "head": head}
        path = Path(out or f"fid-part{part}-of{parts}.pt")
        write_atomic(path, lambda f: torch.save(record, f))
        print(f"FID part {part + 1}/{parts}: statistics of {drawn} samples -> {path}")
        return {**info, "part": part, "parts": parts, "drawn": drawn, "path": str(path)}
    results = {**info, **_fids(real, _stats(metric, "fake"), head, reference_cache)}
    if out:
        write_json(out, results)
    print(_summary(results) + (f" -> {out}" if out else ""))
    return results


def _fids(real: dict[str, Tensor], fake: dict[str, Tensor], head: dict[str, Tensor], reference: Path | None) -> dict:
    """``fid``, ``fid_at_reference_size`` and ``reference_fid`` (None without a held-out split)."""
    fids = {"fid": fid_from_stats(real, fake), "fid_at_reference_size": None, "reference_fid": None}
    if reference is not None:
        fids["fid_at_reference_size"] = fid_from_stats(real, head)
        fids["reference_fid"] = fid_from_stats(real, torch.load(reference, weights_only=True))
    return fids


def _summary(results: dict) -> str:
    """The printed line: the FID with what was compared, the reference at equal size, the features."""
    line = (
        f"FID {results['fid']:.3f} ({results['num_samples']} samples at T={results['temperature']}, "
        f"seed {results['seed']}, vs {results['real_images']} {results['split']} images)"
    )
    if results["reference_fid"] is None:
        line += "; no held-out split for a real-vs-real reference"
    else:
        n = results["reference_size"]
        line += (
            f"; at {n} samples {results['fid_at_reference_size']:.3f} vs real-vs-real reference "
            f"{results['reference_fid']:.3f} ({n} {results['reference_split']} images)"
        )
    return line + f"; features {describe_extractor({'name': results['features'], **results['feature_extractor']})}"


def merge_fid(part_files: list[str | Path], out: str | Path | None = None) -> dict:
    """Add the statistics of ``glowlab evaluate fid --parts N`` runs and compute the FIDs and reference."""
    from glowlab.files import write_json

    records = []
    for p in part_files:
        try:
            record = torch.load(p, weights_only=True)
        except Exception as exn:  # not a torch file, truncated, or holding other objects
            raise ValueError(f"{p}: not a part of glowlab evaluate fid --parts ({exn})") from exn
        if not isinstance(record, dict) or not {"part", "parts", "fake", "head"} <= set(record):
            raise ValueError(f"{p}: not a part of glowlab evaluate fid --parts (no part, parts and statistics)")
        records.append(record)
    shared = (
        "checkpoint",
        "data",
        "split",
        "features",
        "feature_extractor",
        "temperature",
        "guidance",
        "weights",
        "num_samples",
        "seed",
        "real_statistics",
        "reference_split",
        "reference_size",
        "reference_statistics",
    )
    first = records[0]
    for p, r in zip(part_files, records, strict=True):
        for key in (*shared, "parts"):
            if r.get(key) != first.get(key):
                raise ValueError(f"{p}: {key}={r.get(key)!r} differs from {part_files[0]}'s {first.get(key)!r}")
    found = sorted(r["part"] for r in records)
    if found != list(range(first["parts"])):
        raise ValueError(f"expected parts 0..{first['parts'] - 1}, got {found}")
    fake = {name: sum(r["fake"][name] for r in records) for name in STATE}
    head = {name: sum(r["head"][name] for r in records) for name in STATE}
    real = torch.load(first["real_statistics"], weights_only=True)
    reference = Path(first["reference_statistics"]) if first["reference_statistics"] else None
    results = {key: first[key] for key in shared}
    results.update(real_images=int(real["features_num_samples"]), parts=first["parts"])
    results.update(_fids(real, fake, head, reference))
    if out:
        write_json(out, results)
    print(_summary(results) + f"; merged from {len(records)} parts" + (f" -> {out}" if out else ""))
    return results
