"""Pictures from image models: sample grids, interpolations, attribute manipulation, displays.

Used alike by the training callbacks (sample grids during training) and the jobs (``glowlab
sample``, ``interpolate``, ``manipulate``). Models are passed in; nothing here trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import save_image

from glowlab.files import write_atomic
from glowlab.likelihood import bin_centers, to_unit_range
from glowlab.models import MultiscaleFlow


def sample_grid(
    model: MultiscaleFlow,
    temperatures: Sequence[float],
    per_row: int,
    seed: int = 0,
    min_pixels: int = 32,
    classes: Sequence[int] | None = None,
) -> Tensor:
    """Samples as display intensities in [0, 1], ``per_row`` to a row.

    One row per temperature: the same latent noise (from ``seed``) scaled by each temperature, so
    rows differ only in temperature; conditional models get labels 0, 1, 2, ... along each row.
    With ``classes`` (conditional models), one row per class instead, at the first temperature.
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
        images = torch.cat([model.decode([t * z for z in base], y) for t, y in rows])  # (rows * per_row, C, H, W)
    model.train(was_training)
    return display(images, model.n_bins, min_pixels)


def display(x: Tensor, n_bins: int, min_pixels: int = 32) -> Tensor:
    """Model-space images as [0, 1] intensities on the CPU, enlarged (nearest) to ``min_pixels``."""
    images = to_unit_range(x, n_bins).float().cpu()
    scale = max(1, -(-min_pixels // images.shape[-1]))
    return F.interpolate(images, scale_factor=scale, mode="nearest") if scale > 1 else images


def save_sample_grid(images: Tensor, per_row: int, path: str | Path) -> Path:
    """Write ``images`` (N, C, H, W) in [0, 1] as a PNG grid with ``per_row`` images a row."""
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"refusing to write {path}: the images hold non-finite values")
    return write_atomic(path, lambda f: save_image(images, f, format="png", nrow=per_row, padding=2, pad_value=1.0))


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation per example (rows of the flattened latents); linear when parallel."""
    a_flat, b_flat = a.flatten(1), b.flatten(1)  # (B, D)
    cos = torch.nn.functional.cosine_similarity(a_flat, b_flat, dim=1).clamp(-1, 1)
    omega = torch.acos(cos)[:, None]  # (B, 1)
    sin = torch.sin(omega)
    linear = (1 - t) * a_flat + t * b_flat
    spherical = (torch.sin((1 - t) * omega) * a_flat + torch.sin(t * omega) * b_flat) / sin.clamp_min(1e-12)
    return torch.where(sin > 1e-6, spherical, linear).reshape(a.shape)  # (B, D) -> a's shape


def interpolate(model: MultiscaleFlow, x: Tensor, steps: int, mode: str = "linear", y: Tensor | None = None) -> Tensor:
    """Decoded images along the path through ``x[0], x[1], ...`` with ``steps`` images per segment.

    Every level's latent is interpolated. Returns (segments * (steps - 1) + 1, C, H, W); segment
    endpoints are the inputs' exact reconstructions. Conditional models use ``y`` (one label) for
    every encoding and decoding, so endpoints still reproduce the inputs.
    """
    if mode not in ("linear", "slerp"):
        raise ValueError(f"--mode {mode!r}: choose linear or slerp")
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


def attribute_direction(model: MultiscaleFlow, x: Tensor, has: Tensor, y: Tensor | None = None) -> list[Tensor]:
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
    model: MultiscaleFlow, x: Tensor, direction: list[Tensor], strengths: Sequence[float], y: Tensor | None = None
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
