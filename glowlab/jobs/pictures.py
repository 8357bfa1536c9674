"""``glowlab sample``, ``glowlab interpolate``, ``glowlab manipulate``: pictures from an image model.

Each job parses its own options and calls :mod:`glowlab.images` with keywords.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from glowlab.jobs.args import job_parser


def finite(text: str) -> float:
    """An argparse type: a finite number (``nan`` and ``inf`` are refused, naming the option)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def temperature(text: str) -> float:
    """An argparse type: a finite temperature >= 0."""
    value = finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a temperature is >= 0")
    return value


def _check_split(parser: argparse.ArgumentParser, data: str, *splits: str) -> None:
    from glowlab.data.shards import read_manifest

    found = read_manifest(data)["splits"]
    for split in splits:
        if split not in found:
            parser.error(f"split {split!r}: {data} has {', '.join(found)}")


def _model_and_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint of glowlab fit, or an exported model folder")
    parser.add_argument("--data", required=True, help="prepared data folder (or URL / pipe: prefix)")


def sample_main(argv: list[str]) -> Path:
    """``glowlab sample``: a PNG grid of samples from a checkpoint.

    One row per temperature (the same noise scaled by each), or with ``--classes`` one row per
    class of a conditional model. ``--seed`` fixes the grid.
    """
    parser = job_parser("glowlab sample", sample_main.__doc__)
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint of glowlab fit, or an exported model")
    parser.add_argument("--num-samples", type=int, default=64, help="samples per temperature (or per class)")
    parser.add_argument("--temperature", type=temperature, nargs="+", default=[0.7], help="e.g. 0 0.5 0.7 1")
    parser.add_argument("--classes", type=int, nargs="+", help="conditional models: one row per class")
    parser.add_argument(
        "--guidance", type=float, default=0.0, help="classifier-free guidance (class-conditional transformer flows)"
    )
    parser.add_argument("--out", type=Path, default=Path("samples.png"), help="output PNG")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent noise")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--wandb-project", help="also log the grid to this W&B project (offline unless WANDB_MODE)")
    args = parser.parse_args(argv)
    if not args.ckpt.exists():
        parser.error(f"--ckpt {args.ckpt}: no such file or folder")
    if args.num_samples < 1:
        parser.error("--num-samples must be >= 1")
    from glowlab.images import sample_grid, save_sample_grid
    from glowlab.jobs.common import load_image_model, log_to_wandb

    model = load_image_model(args.ckpt, args.device)
    rows = len(args.classes) if args.classes else len(args.temperature)
    images = sample_grid(
        model, args.temperature, args.num_samples, seed=args.seed, classes=args.classes, guidance=args.guidance
    )
    per_row = args.num_samples if rows > 1 else max(1, round(args.num_samples**0.5))
    labels = None
    if rows > 1:
        labels = [f"class {c}" for c in args.classes] if args.classes else [f"T={t:g}" for t in args.temperature]
    path = save_sample_grid(images, per_row, args.out, labels)
    what = f"classes {args.classes}" if args.classes else f"temperature(s) {', '.join(map(str, args.temperature))}"
    print(f"wrote {len(images)} samples at {what} ({model.weights} weights) -> {path}")
    log_to_wandb(
        args.wandb_project, "sample", vars(args) | {"ckpt": str(args.ckpt), "out": str(path)}, {"samples": path}
    )
    return path


def interpolate_main(argv: list[str]) -> Path:
    """``glowlab interpolate``: encode real images, interpolate every level's latent, decode, write a strip."""
    parser = job_parser("glowlab interpolate", interpolate_main.__doc__)
    _model_and_data_args(parser)
    parser.add_argument("--split", default="test")
    parser.add_argument("--indices", type=int, nargs="+", default=[0, 1], help="images of the split to pass through")
    parser.add_argument("--steps", type=int, default=8, help="images per segment, endpoints included")
    parser.add_argument(
        "--mode", choices=("linear", "lerp", "slerp"), default="linear", help="lerp is another name for linear"
    )
    parser.add_argument("--label", type=int, help="conditional models: the class (default: the first image's)")
    parser.add_argument("--out", type=Path, default=Path("interpolation.png"))
    parser.add_argument("--device")
    parser.add_argument("--wandb-project")
    args = parser.parse_args(argv)
    if len(args.indices) < 2:
        parser.error("--indices needs at least two images")
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the segment's two ends)")
    _check_split(parser, args.data, args.split)
    import torch

    from glowlab.data.shards import read_samples
    from glowlab.images import display, interpolate, interpolation_rows, levels_to_model, save_sample_grid
    from glowlab.jobs.common import check_data, load_image_model, log_to_wandb

    model = load_image_model(args.ckpt, args.device)
    check_data(model, args.ckpt, args.data)
    device = next(model.parameters()).device
    samples = read_samples(args.data, args.split, args.indices)
    y = None
    if model.num_classes:
        y = torch.tensor([args.label if args.label is not None else int(samples.labels[0])], device=device)
    x = levels_to_model(samples.levels, model.n_bins, device)
    frames = interpolate(model, x, steps=args.steps, mode=args.mode, y=y)
    # A row per segment with the real images at its ends, so the path and its inputs are compared.
    rows = interpolation_rows(display(x, model.n_bins), display(frames, model.n_bins), args.steps)
    columns = ["input", "", *[f"{t:.2g}" for t in torch.linspace(0, 1, args.steps).tolist()], "", "input"]
    labels = [f"#{a} to #{b}" for a, b in zip(args.indices, args.indices[1:], strict=False)]
    path = save_sample_grid(rows, args.steps + 4, args.out, labels, columns)
    print(f"wrote {len(frames)} frames through images {args.indices} of {args.split} -> {path}")
    log_to_wandb(args.wandb_project, "interpolate", vars(args) | {"out": str(path)}, {"interpolation": path})
    return path


def manipulate_main(argv: list[str]) -> Path:
    """``glowlab manipulate``: move images along an attribute direction in latent space (Glow, Sec. 5).

    The direction is the mean latent of images with the attribute minus the mean of those without,
    over ``--direction-images`` images of ``--direction-split``. ``--attribute`` is ``class=K``
    (label K) or the name of a binary attribute column recorded by prepare (e.g. ``Smiling``).
    """
    parser = job_parser("glowlab manipulate", manipulate_main.__doc__)
    _model_and_data_args(parser)
    parser.add_argument("--attribute", required=True, help="class=K, or an attribute name from the manifest")
    parser.add_argument("--direction-split", default="train")
    parser.add_argument("--direction-images", type=int, default=2000)
    parser.add_argument("--split", default="test", help="where the images to manipulate come from")
    parser.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--strengths", type=finite, nargs="+", default=[-1.0, -0.5, 0.0, 0.5, 1.0])
    parser.add_argument("--out", type=Path, default=Path("manipulation.png"))
    parser.add_argument("--device")
    parser.add_argument("--wandb-project")
    args = parser.parse_args(argv)
    if args.direction_images < 2:
        parser.error("--direction-images must be >= 2 (images with the attribute and images without)")
    _check_split(parser, args.data, args.direction_split, args.split)

    from glowlab.data.shards import read_manifest, read_samples
    from glowlab.images import attribute_direction, display, levels_to_model, manipulate, save_sample_grid
    from glowlab.jobs.common import check_data, load_image_model, log_to_wandb

    model = load_image_model(args.ckpt, args.device)
    check_data(model, args.ckpt, args.data)
    device = next(model.parameters()).device
    manifest = read_manifest(args.data)
    count = manifest["splits"][args.direction_split]["count"]
    pool = read_samples(args.data, args.direction_split, limit=min(args.direction_images, count))
    if args.attribute.startswith("class="):
        value = args.attribute.split("=", 1)[1]
        classes = manifest.get("num_classes")
        if not value.lstrip("-").isdigit() or not classes or not 0 <= int(value) < classes:
            known = f"0..{classes - 1}" if classes else "it has no labels"
            parser.error(f"--attribute {args.attribute}: class=K with K a class of {args.data} ({known})")
        has = pool.labels == int(value)
    else:
        names = manifest.get("attribute_names") or []
        if args.attribute not in names:
            parser.error(
                f"--attribute {args.attribute!r}: {args.data} has attributes {names or 'none'}; or use class=K"
            )
        has = pool.attributes[:, names.index(args.attribute)].bool()
    y_pool = pool.labels.to(device) if model.num_classes else None
    x_pool = levels_to_model(pool.levels, model.n_bins, device)
    direction = attribute_direction(model, x_pool, has.to(device), y=y_pool)
    chosen = read_samples(args.data, args.split, args.indices)
    y = chosen.labels.to(device) if model.num_classes else None
    x = levels_to_model(chosen.levels, model.n_bins, device)
    images = manipulate(model, x, direction, strengths=args.strengths, y=y)
    labels = [f"#{i}" for i in args.indices]
    columns = [f"{s:+g}" if s else "0" for s in args.strengths]
    path = save_sample_grid(display(images, model.n_bins), len(args.strengths), args.out, labels, columns)
    print(f"wrote {len(args.indices)} images x strengths {args.strengths} along {args.attribute} -> {path}")
    log_to_wandb(args.wandb_project, "manipulate", vars(args) | {"out": str(path)}, {"manipulation": path})
    return path
