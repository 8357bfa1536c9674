"""``glowlab sample``, ``glowlab interpolate`` and ``glowlab manipulate``: pictures from a checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from glowlab.likelihood import bin_centers
from glowlab.models import Glow
from glowlab.training.callbacks import save_sample_grid


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation per example (rows of the flattened latents); linear when parallel."""
    a_flat, b_flat = a.flatten(1), b.flatten(1)  # (B, D)
    cos = torch.nn.functional.cosine_similarity(a_flat, b_flat, dim=1).clamp(-1, 1)
    omega = torch.acos(cos)[:, None]  # (B, 1)
    sin = torch.sin(omega)
    linear = (1 - t) * a_flat + t * b_flat
    spherical = (torch.sin((1 - t) * omega) * a_flat + torch.sin(t * omega) * b_flat) / sin.clamp_min(1e-12)
    return torch.where(sin > 1e-6, spherical, linear).reshape(a.shape)  # (B, D) -> a's shape


def interpolate(model: Glow, x: Tensor, steps: int, mode: str = "linear", y: Tensor | None = None) -> Tensor:
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


def attribute_direction(model: Glow, x: Tensor, has: Tensor, y: Tensor | None = None) -> list[Tensor]:
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
    model: Glow, x: Tensor, direction: list[Tensor], strengths: Sequence[float], y: Tensor | None = None
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


def save(images: Tensor, per_row: int, out: str | Path) -> Path:
    return save_sample_grid(images, per_row, out)
