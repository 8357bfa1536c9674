"""Pictures from image models: sample grids, interpolations, attribute manipulation, displays.

Used alike by the training callbacks (sample grids during training) and the jobs (``glowlab
sample``, ``interpolate``, ``manipulate``). Models are passed in; nothing here trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

from glowlab.files import write_atomic
from glowlab.likelihood import bin_centers, to_unit_range
from glowlab.models import ImageFlow


def sample_grid(
    model: ImageFlow,
    temperatures: Sequence[float],
    per_row: int,
    seed: int = 0,
    min_pixels: int = 32,
    classes: Sequence[int] | None = None,
    guidance: float = 0.0,
) -> Tensor:
    """Samples as display intensities in [0, 1], ``per_row`` to a row.

    One row per temperature: the same latent noise (from ``seed``) scaled by each temperature, so
    rows differ only in temperature; conditional models get labels 0, 1, 2, ... along each row.
    With ``classes`` (conditional models), one row per class instead, at the first temperature.
    ``guidance`` is classifier-free guidance (class-conditional transformer flows).
    Images smaller than ``min_pixels`` are enlarged with nearest-neighbour so 8x8 digits are legible.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    base = model.sample_latents(per_row, 1.0, generator)
    if classes is not None:
        if not model.num_classes:
            raise ValueError("classes need a class-conditional model (num_classes set)")
        bad = [c for c in classes if not 0 <= c < model.num_classes]
        if bad:
            raise ValueError(f"class {bad[0]} is not in 0..{model.num_classes - 1}")
        rows = [(temperatures[0], torch.full((per_row,), c, device=device)) for c in classes]
    else:
        y = torch.arange(per_row, device=device) % model.num_classes if model.num_classes else None
        rows = [(t, y) for t in temperatures]
    with torch.no_grad():
        images = torch.cat(
            [model.decode_samples([t * z for z in base], y, guidance) for t, y in rows]
        )  # (rows * per_row, C, H, W)
    model.train(was_training)
    return display(images, model.n_bins, min_pixels)


def display(x: Tensor, n_bins: int, min_pixels: int = 32) -> Tensor:
    """Model-space images as [0, 1] intensities on the CPU, enlarged (nearest) to ``min_pixels``."""
    images = to_unit_range(x, n_bins).float().cpu()
    scale = max(1, -(-min_pixels // images.shape[-1]))
    return F.interpolate(images, scale_factor=scale, mode="nearest") if scale > 1 else images


def save_sample_grid(
    images: Tensor,
    per_row: int,
    path: str | Path,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    captions: Sequence[str] | None = None,
) -> Path:
    """Write ``images`` (N, C, H, W) in [0, 1] as a PNG grid with ``per_row`` images a row.

    ``row_labels`` (one per row, e.g. ``T=0.7``) go in a white margin left of the rows,
    ``column_labels`` (one per column, empty strings allowed) in a margin above them, and
    ``captions`` (one per image, e.g. its bits/dim) under each image.
    """
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"refusing to write {path}: the images hold non-finite values")
    grid = make_grid(images, nrow=per_row, padding=PADDING, pad_value=1.0)  # (C, H', W'), C is 3 even for grey
    picture = Image.fromarray(grid.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    rows = -(-len(images) // per_row)
    for labels, count, what in (
        (row_labels, rows, "rows"),
        (column_labels, min(per_row, len(images)), "columns"),
        (captions, len(images), "images"),
    ):
        if labels is not None and len(labels) != count:
            raise ValueError(f"{len(labels)} labels for {count} {what}")
    row_height = images.shape[-2] + PADDING
    if captions is not None:
        picture = _captioned(picture, captions, per_row, row_height, images.shape[-1] + PADDING)
        row_height += CAPTION_HEIGHT
    picture = _labelled(picture, row_labels, column_labels, row_height, images.shape[-1] + PADDING)
    return write_atomic(path, lambda f: picture.save(f, format="png"))


CAPTION_HEIGHT = 14  # pixels of the band under each row of a captioned grid


def _captioned(
    picture: Image.Image, captions: Sequence[str], per_row: int, row_height: int, column_width: int
) -> Image.Image:
    """``picture`` (a grid) with a white band under each row holding each image's caption, centred."""
    rows = -(-len(captions) // per_row)
    out = Image.new("RGB", (picture.width, picture.height + rows * CAPTION_HEIGHT), "white")
    font = ImageFont.load_default(size=10)
    draw = ImageDraw.Draw(out)
    for r in range(rows):
        # Row r of make_grid's layout spans [r * row_height, (r + 1) * row_height + PADDING).
        strip = picture.crop((0, r * row_height, picture.width, (r + 1) * row_height + PADDING))
        top = r * (row_height + CAPTION_HEIGHT)
        out.paste(strip.convert("RGB"), (0, top))
        for c, caption in enumerate(captions[r * per_row : (r + 1) * per_row]):
            x = PADDING + c * column_width + (column_width - PADDING) // 2
            draw.text(
                (x, top + row_height + PADDING + CAPTION_HEIGHT // 2 - 1), caption, fill="black", font=font, anchor="mm"
            )
    return out


PADDING = 2  # pixels between the images of a grid (white)


def _labelled(
    picture: Image.Image,
    row_labels: Sequence[str] | None,
    column_labels: Sequence[str] | None,
    row_height: int,
    column_width: int,
) -> Image.Image:
    """``picture`` with white margins left (one label per row) and above (one per column), centred."""
    if not row_labels and not column_labels:
        return picture
    font = ImageFont.load_default(size=max(10, min(14, row_height // 2)))
    measure = ImageDraw.Draw(picture)
    left = max((int(measure.textlength(t, font=font)) for t in row_labels or []), default=-8) + 8
    top = 18 if column_labels else 0
    out = Image.new("RGB", (picture.width + left, picture.height + top), "white")
    out.paste(picture.convert("RGB"), (left, top))
    draw = ImageDraw.Draw(out)
    for i, label in enumerate(row_labels or []):
        draw.text((4, top + PADDING + i * row_height + row_height // 2), label, fill="black", font=font, anchor="lm")
    for j, label in enumerate(column_labels or []):
        x = left + PADDING + j * column_width + column_width // 2
        draw.text((x, top // 2), label, fill="black", font=font, anchor="mm")
    return out


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation per example (rows of the flattened latents); linear when parallel."""
    a_flat, b_flat = a.flatten(1), b.flatten(1)  # (B, D)
    cos = torch.nn.functional.cosine_similarity(a_flat, b_flat, dim=1).clamp(-1, 1)
    omega = torch.acos(cos)[:, None]  # (B, 1)
    sin = torch.sin(omega)
    linear = (1 - t) * a_flat + t * b_flat
    spherical = (torch.sin((1 - t) * omega) * a_flat + torch.sin(t * omega) * b_flat) / sin.clamp_min(1e-12)
    return torch.where(sin > 1e-6, spherical, linear).reshape(a.shape)  # (B, D) -> a's shape


def interpolate(model: ImageFlow, x: Tensor, steps: int, mode: str = "linear", y: Tensor | None = None) -> Tensor:
    """Decoded images along the path through ``x[0], x[1], ...`` with ``steps`` images per segment.

    Every level's latent is interpolated. Returns (segments * (steps - 1) + 1, C, H, W); segment
    endpoints are the inputs' exact reconstructions. Conditional models use ``y`` (one label) for
    every encoding and decoding, so endpoints still reproduce the inputs.
    """
    mode = "linear" if mode == "lerp" else mode
    if mode not in ("linear", "slerp"):
        raise ValueError(f"--mode {mode!r}: choose linear (or lerp) or slerp")
    if steps < 2 or len(x) < 2:
        raise ValueError("interpolation needs at least 2 images and 2 steps")
    labels = None if y is None else y.expand(len(x))
    with torch.no_grad():
        zs, _ = model.encode(x, labels)
        frames = []
        for i in range(len(x) - 1):
            for k, t in enumerate(torch.linspace(0, 1, steps).tolist()):
                if i and k == 0:
                    continue  # shared endpoint of two segments
                mix = [
                    (1 - t) * z[i : i + 1] + t * z[i + 1 : i + 2]
                    if mode == "linear"
                    else slerp(z[i : i + 1], z[i + 1 : i + 2], t)
                    for z in zs
                ]
                frames.append(model.decode(mix, None if y is None else y.expand(1)))
    return torch.cat(frames)


def interpolation_rows(inputs: Tensor, frames: Tensor, steps: int) -> Tensor:
    """One row per segment: the real input, a gap, the ``steps`` decoded frames, a gap, the next input.

    ``inputs`` (n, C, H, W) and ``frames`` (the output of :func:`interpolate`, shared endpoints
    once) are display images in [0, 1]; returns (n - 1) rows of ``steps + 4`` images, gaps white.
    """
    gap = torch.ones_like(inputs[:1])
    rows = []
    for i in range(len(inputs) - 1):
        segment = frames[i * (steps - 1) : i * (steps - 1) + steps]  # its frames, both endpoints included
        rows += [inputs[i : i + 1], gap, segment, gap, inputs[i + 1 : i + 2]]
    return torch.cat(rows)


def attribute_direction(model: ImageFlow, x: Tensor, has: Tensor, y: Tensor | None = None) -> list[Tensor]:
    """Per level: mean latent of images with the attribute minus the mean of those without.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018 (Sec. 5).
    """
    has = has.bool()
    if has.all() or not has.any():
        raise ValueError(
            f"the attribute must hold for some images and not others (holds for {int(has.sum())} of {len(has)})"
        )
    with torch.no_grad():
        zs, _ = model.encode(x, y)
    return [z[has].mean(0) - z[~has].mean(0) for z in zs]


def manipulate(
    model: ImageFlow, x: Tensor, direction: list[Tensor], strengths: Sequence[float], y: Tensor | None = None
) -> Tensor:
    """Each image with ``strength * direction`` added to its latents: (len(x) * len(strengths), C, H, W), row-major."""
    with torch.no_grad():
        zs, _ = model.encode(x, y)
        out = []
        for i in range(len(x)):
            for s in strengths:
                yi = None if y is None else y[i : i + 1]
                out.append(model.decode([z[i : i + 1] + s * d for z, d in zip(zs, direction, strict=True)], yi))
    return torch.cat(out)


def levels_to_model(levels: Tensor, n_bins: int, device: torch.device | str) -> Tensor:
    """Integer images at their bin centres (no noise): the deterministic model-space input."""
    return bin_centers(levels, n_bins).to(device)
