"""``glowlab report RUN``: the figures and checks a researcher looks at after a run, in ``RUN/report/``.

- ``curves.png``: training and validation bits/dim against optimizer steps and wall-clock time.
- ``samples.png``: the run's sample grids over training, side by side (``samples/step_*.png``,
  ``best.png``, ``last.png``).
- ``reconstruction.png``: encode-decode error after each level (invert the flow from that level's
  output back to the image) and through the whole model, against the half-bin that would change a
  pixel's grey level.
- ``neighbours.png``: nearest training image (pixel L2) of each sample and, as the reference, of
  each test image: a memorising model puts its samples much nearer the training set than held-out
  images are. Samples that decode to non-finite values (Glow's inverse can overflow far in the
  tails) are counted in ``report.json`` and left out of the distances.
- ``extremes.png``: the most and least likely test images with their bits/dim.
- class-conditional models: how often the data set's feature classifier (``glowlab evaluate
  train-classifier``) names the class each sample was drawn for.
- ``report.json``: every number behind the figures; the figures and numbers also go to the run's
  W&B run (``RUN/wandb.json``) when it recorded one.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from glowlab.files import write_json
from glowlab.jobs.args import job_parser
from glowlab.jobs.common import check_data, default_device, load_image_model
from glowlab.likelihood import quantize
from glowlab.models import ImageFlow, MultiscaleFlow

# Metric columns by preference: the first one present in metrics.csv is plotted.
TRAIN_COLUMNS = ("train_bpd_step", "train_bpd", "train_nll_step", "train_loss")
VAL_COLUMNS = ("val_bpd", "val_nll")


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def read_curves(metrics: Path) -> dict[str, Any]:
    """Training and validation series of a run's ``metrics.csv``: steps, values and wall-clock seconds.

    ``time_s`` (written on the training log rows) gives each step a time; validation points get
    theirs by interpolating between those rows.
    """
    if not metrics.is_file():
        raise ValueError(f"{metrics}: no metrics.csv in the run folder (was it written by glowlab fit?)")
    with metrics.open(newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set()
    train_name = next((c for c in TRAIN_COLUMNS if c in columns), None)
    val_name = next((c for c in VAL_COLUMNS if c in columns), None)
    if train_name is None:
        raise ValueError(f"{metrics}: no training loss column (one of {', '.join(TRAIN_COLUMNS)})")

    def series(name: str | None) -> tuple[np.ndarray, np.ndarray]:
        points = [(_float(r.get("step")), _float(r.get(name))) for r in rows] if name else []
        points = sorted((int(s), v) for s, v in points if s is not None and v is not None)
        return np.array([p[0] for p in points], dtype=np.int64), np.array([p[1] for p in points])

    clock = sorted(
        {(int(s), t) for s, t in ((_float(r.get("step")), _float(r.get("time_s"))) for r in rows) if s and t}
    )
    train_steps, train_values = series(train_name)
    val_steps, val_values = series(val_name)
    clock_steps = np.array([c[0] for c in clock], dtype=np.float64)
    clock_seconds = np.array([c[1] for c in clock])

    def seconds(steps: np.ndarray) -> np.ndarray | None:
        return np.interp(steps, clock_steps, clock_seconds) if len(clock) >= 2 else None

    return {
        "train": {"name": train_name, "steps": train_steps, "values": train_values, "seconds": seconds(train_steps)},
        "val": {"name": val_name, "steps": val_steps, "values": val_values, "seconds": seconds(val_steps)},
    }


def sample_pictures(run: Path) -> list[tuple[str, Path]]:
    """The run's sample grids, ``(title, path)``: up to six steps evenly spaced over training, then best and last."""
    steps = sorted((run / "samples").glob("step_*.png"))
    if len(steps) > 6:
        steps = [steps[round(i * (len(steps) - 1) / 5)] for i in range(6)]
    found = [(f"step {int(p.stem.split('_')[1])}", p) for p in steps]
    found += [(f"{name} weights", run / "samples" / f"{name}.png") for name in ("best", "last")]
    return [(title, path) for title, path in found if path.is_file()]


@torch.no_grad()
def reconstruction_errors(model: ImageFlow, x: Tensor, y: Tensor | None = None) -> list[dict[str, float]]:
    """Encode-decode error of ``x`` after each level and through the whole model (the top prior included).

    Row ``l`` runs the flow forward through levels ``0..l``, then inverts it back to the image;
    the last row is ``decode(encode(x))``. Errors are in the model's units (an image spans 1, a
    grey level ``1 / n_bins``); ``changed`` is the fraction of pixels whose grey level the round
    trip changes (error beyond half a bin).
    """
    from glowlab.flows.squeeze import to_memory_format

    half_bin = 0.5 / model.n_bins
    rows = []

    def row(name: str, back: Tensor) -> dict[str, float]:
        error = (back.float() - x.float()).abs()
        return {
            "stage": name,
            "max_abs": float(error.max()),
            "rms": float(error.pow(2).mean().sqrt()),
            "changed": float((error > half_bin).float().mean()),
        }

    h = to_memory_format(x, model.config.memory_format)
    latents: list[Tensor] = []
    levels = model.levels if isinstance(model, MultiscaleFlow) else []  # a transformer flow has no levels
    for index, level in enumerate(levels):
        h = level(h, y)[0]
        full = h  # the level's whole output; the kept half goes on, the other is that level's latent
        back = full
        for i in reversed(range(index + 1)):
            back = model.levels[i].inverse(back, y)
            if i > 0:
                back = torch.cat([back, latents[i - 1]], dim=1)
        rows.append(row(f"level {index + 1}", back))
        h, z = level.chunk(h)
        if z is not None:
            latents.append(z)
    zs, _ = model.encode(x, y)
    rows.append(row("whole model", model.decode(zs, y)))
    return rows


def nearest_distances(queries: Tensor, references: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """L2 distance from each query (N, D) to its nearest reference (M, D), and that reference's index."""
    distances, indices = [], []
    references = references.float()
    for start in range(0, len(queries), chunk):
        batch = queries[start : start + chunk].float()
        # cdist's matrix-product form finds the nearest fast, but its rounding leaves an exact copy
        # about 1e-3 away: the distance reported is the nearest one's, computed directly.
        best = torch.cdist(batch, references).argmin(dim=1)  # (chunk, M) -> (chunk,)
        distances.append((batch - references[best]).norm(dim=1))
        indices.append(best)
    return torch.cat(distances), torch.cat(indices)


def _unit(levels: Tensor, n_bins: int) -> Tensor:
    """uint8 grey levels (N, C, H, W) -> flat [0, 1] intensities (N, D), the space distances are measured in."""
    return levels.float().div(n_bins - 1).flatten(1)


def sample_class_accuracy(
    samples: Tensor, labels: Tensor, n_bins: int, root: str, classifier: str | None = None
) -> dict[str, Any] | None:
    """How often the data set's feature classifier (``evaluate train-classifier``) names the class a
    conditional model's sample was drawn for: overall, per class, and the classifier's own val accuracy.

    None when there is no classifier file (``classifier``, default ``DATA/fid_classifier.pt``).
    """
    from glowlab.jobs.classifier import CLASSIFIER_FILE, load_classifier, to_uint8

    path = Path(classifier) if classifier else Path(root) / CLASSIFIER_FILE
    if not path.is_file():
        if classifier:
            raise ValueError(f"--classifier {classifier}: no such file")
        return None
    network, record = load_classifier(path)
    with torch.no_grad():
        predicted = torch.cat([network.logits(to_uint8(part, n_bins)).argmax(1) for part in samples.split(512)])
    right = predicted == labels
    per_class = {int(k): float(right[labels == k].float().mean()) for k in labels.unique()}
    return {
        "accuracy": float(right.float().mean()),
        "per_class": per_class,
        "samples": len(labels),
        "classifier": str(path),
        "classifier_val_accuracy": record.get("val_accuracy"),
    }


def _data_root(run: Path, data: str | None) -> str:
    if data is not None:
        return data
    config = run / "config.yaml"
    root = None
    if config.is_file():
        root = ((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("root")
    if not root:
        raise ValueError(f"{run}: no data.root in config.yaml; pass --data (the prepared data folder)")
    return str(root)


def _checkpoint(run: Path, ckpt: str) -> Path:
    path = Path(ckpt) if ckpt not in ("best", "last") else run / "checkpoints" / f"{ckpt}.ckpt"
    last = run / "checkpoints" / "last.ckpt"
    if ckpt == "best" and not path.is_file() and last.is_file():
        # A run that stopped before its first validation has no best checkpoint: say so, use the last.
        print(f"glowlab report: no {path} (no validation ran); using {last}")
        return last
    if not path.is_file() and not path.is_dir():
        raise ValueError(f"--ckpt {ckpt}: {path} does not exist")
    return path


def report(
    run: str | Path,
    *,
    data: str | None = None,
    ckpt: str = "best",
    out: str | Path | None = None,
    num_samples: int = 256,
    temperature: float = 1.0,
    reference_images: int = 256,
    train_limit: int = 50000,
    batch_size: int = 256,
    seed: int = 0,
    device: str | None = None,
    classifier: str | None = None,
    wandb: bool = True,
) -> dict[str, Any]:
    """Write the report of a ``glowlab fit`` run folder (see the module docstring); returns what report.json holds."""
    from glowlab.data.shards import read_samples
    from glowlab.images import display, levels_to_model, save_sample_grid
    from glowlab.jobs.score import extremes_picture, image_scores
    from glowlab.plots import save_curves, save_histograms, save_level_errors, save_pictures

    run = Path(run)
    if not run.is_dir():
        raise ValueError(f"{run}: not a run folder")
    out = Path(out) if out is not None else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    root = _data_root(run, data)
    path = _checkpoint(run, ckpt)
    device = device or default_device()
    model = load_image_model(path, device)
    contract = check_data(model, path, root)
    result: dict[str, Any] = {"run": str(run), "checkpoint": str(path), "data": root, "figures": {}}

    # Curves: what training did, against steps and against time.
    curves = read_curves(run / "metrics.csv")
    result["figures"]["curves"] = str(save_curves(curves, out / "curves.png", _test_line(run)))
    val = curves["val"]
    if len(val["values"]):
        best = int(np.argmin(val["values"]))
        result["best_val"] = {"step": int(val["steps"][best]), val["name"]: float(val["values"][best])}

    pictures = sample_pictures(run)
    if pictures:
        result["figures"]["samples"] = str(save_pictures(pictures, out / "samples.png"))

    # Reconstruction per level, on test images (their labels for a conditional model).
    test = read_samples(root, "test", limit=min(batch_size, 64))
    x = levels_to_model(test.levels, model.n_bins, device)
    y = test.labels.to(device) if model.num_classes else None
    errors = reconstruction_errors(model, x, y)
    result["reconstruction"] = errors
    result["figures"]["reconstruction"] = str(save_level_errors(errors, 0.5 / model.n_bins, out / "reconstruction.png"))

    # Nearest neighbours: samples and held-out images against the training set.
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = None
    if model.num_classes:
        labels = torch.arange(num_samples, device=device) % model.num_classes
    drawn, finite = [], []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        part = labels[start : start + n] if labels is not None else None
        images = model.sample(n, temperature, part, generator=generator)
        finite.append(torch.isfinite(images).flatten(1).all(1).cpu())
        # Non-finite samples are counted and left out below; quantize's clamp would not make them images.
        drawn.append(quantize(torch.nan_to_num(images), model.n_bins).to(torch.uint8).cpu())
    kept = torch.cat(finite)
    if not bool(kept.any()):
        raise ValueError(f"{path}: none of the {num_samples} samples at T={temperature:g} is finite; no report")
    samples = torch.cat(drawn)[kept]  # uint8 levels (N, C, H, W)
    labels = labels.cpu()[kept] if labels is not None else None
    train = read_samples(root, "train", limit=train_limit)
    held_out = read_samples(root, "test", limit=reference_images)
    references = _unit(train.levels, model.n_bins)
    sample_d, sample_nn = nearest_distances(_unit(samples, model.n_bins), references)
    test_d, _ = nearest_distances(_unit(held_out.levels, model.n_bins), references)
    threshold = float(torch.quantile(test_d, 0.05))
    result["neighbours"] = {
        "samples": len(samples),
        "non_finite_samples": int((~kept).sum()),
        "temperature": temperature,
        "train_images": len(references),
        "test_images": len(test_d),
        "sample_median": float(sample_d.median()),
        "test_median": float(test_d.median()),
        "ratio_of_medians": float(sample_d.median() / test_d.median()),
        "test_5th_percentile": threshold,
        "samples_below_test_5th_percentile": float((sample_d < threshold).float().mean()),
        "exact_copies": int((sample_d == 0).sum()),
    }
    closest = sample_d.argsort()[:8]
    pairs = torch.cat([samples[closest], train.levels[sample_nn[closest]]])  # row 1 samples, row 2 their neighbours
    save_sample_grid(
        display(levels_to_model(pairs, model.n_bins, "cpu"), model.n_bins, min_pixels=64),
        len(closest),
        out / "neighbour-pairs.png",
        row_labels=["sample", "nearest train"],
        captions=[f"d={float(d):.2f}" for d in sample_d[closest]] + [f"#{int(i)}" for i in sample_nn[closest]],
    )
    result["figures"]["neighbour_pairs"] = str(out / "neighbour-pairs.png")
    result["figures"]["neighbours"] = str(
        save_histograms(
            {f"samples (T={temperature:g})": sample_d.numpy(), "test images": test_d.numpy()},
            out / "neighbours.png",
            xlabel="L2 distance to the nearest training image (pixels in [0, 1])",
            title=f"{len(references)} training images; {result['neighbours']['samples_below_test_5th_percentile']:.1%} "
            "of samples nearer than 95% of test images"
            + (f"; {int((~kept).sum())} non-finite samples left out" if not bool(kept.all()) else ""),
        )
    )

    if labels is not None:
        result["class_accuracy"] = sample_class_accuracy(samples, labels, model.n_bins, root, classifier)
        if result["class_accuracy"] is not None:
            result["class_accuracy"]["temperature"] = temperature

    # The most and least likely test images.
    indices, bpd = image_scores(model, root, "test", batch_size)
    result["figures"]["extremes"] = str(extremes_picture(model, root, "test", indices, bpd, out / "extremes.png"))
    result["test_bpd_single_draw"] = {"mean": float(bpd.double().mean()), "images": len(bpd)}
    result["data_contract"] = contract.describe()

    write_json(out / "report.json", result)
    if wandb:
        result["wandb"] = _log_to_run(run, result)
    print(f"report of {run} ({path.name}) -> {out}")
    return result


def _test_line(run: Path) -> str | None:
    results = run / "test_results.json"
    if not results.is_file():
        return None
    values = json.loads(results.read_text())
    metric = next((k for k in ("test_bpd", "test_nll") if k in values), None)
    return f"{metric} {values[metric]:.4f} ({Path(str(values.get('checkpoint', ''))).name})" if metric else None


def _log_to_run(run: Path, result: dict[str, Any]) -> str | None:
    """Log the figures and numbers into the W&B run that ``RUN/wandb.json`` recorded; its id, or None."""
    record_path = run / "wandb.json"
    if not record_path.is_file():
        return None
    import os

    import wandb

    record = json.loads(record_path.read_text())
    os.environ.setdefault("WANDB_MODE", record.get("mode") or "offline")
    folder = Path(record.get("folder") or run)
    # The record names the run's own W&B folder (SAVE_DIR/wandb/RUN); wandb.init wants SAVE_DIR.
    save_dir = folder.parent.parent if folder.parent.name == "wandb" else run
    logged = wandb.init(id=record["id"], project=record.get("project"), dir=str(save_dir), resume="allow")
    numbers = {f"report/neighbours/{k}": v for k, v in result["neighbours"].items() if isinstance(v, int | float)}
    numbers |= {f"report/reconstruction/{r['stage']}/max_abs": r["max_abs"] for r in result["reconstruction"]}
    images = {f"report/{name}": wandb.Image(path) for name, path in result["figures"].items()}
    logged.log({**numbers, **images})
    logged.finish()
    return record["id"]


def main(argv: list[str]) -> dict:
    """``glowlab report RUN``: curves, samples over training, reconstruction, neighbour and likelihood checks."""
    parser = job_parser("glowlab report", __doc__)
    parser.add_argument("run", help="a run folder of glowlab fit (runs/digits/version_0)")
    parser.add_argument("--ckpt", default="best", help="best, last, or a checkpoint file")
    parser.add_argument("--data", help="prepared data folder (default: data.root of RUN/config.yaml)")
    parser.add_argument("--out", help="output folder (default: RUN/report)")
    parser.add_argument("--num-samples", type=int, default=256, help="samples for the nearest-neighbour check")
    parser.add_argument("--temperature", type=float, default=1.0, help="temperature of those samples")
    parser.add_argument("--reference-images", type=int, default=256, help="test images for the reference distances")
    parser.add_argument("--train-limit", type=int, default=50000, help="training images searched for neighbours")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument(
        "--classifier", help="conditional models: class accuracy of samples (default: DATA/fid_classifier.pt)"
    )
    parser.add_argument("--no-wandb", action="store_true", help="do not log to the run's W&B run")
    args = parser.parse_args(argv)
    for name in ("num_samples", "reference_images", "train_limit", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        parser.error(f"--temperature {args.temperature}: a finite temperature >= 0")
    return report(
        args.run,
        data=args.data,
        ckpt=args.ckpt,
        out=args.out,
        num_samples=args.num_samples,
        temperature=args.temperature,
        reference_images=args.reference_images,
        train_limit=args.train_limit,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        classifier=args.classifier,
        wandb=not args.no_wandb,
    )
