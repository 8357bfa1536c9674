"""What bf16 autocast changes in a trained digits Glow: bits/dim per image, latents, decode(encode(x)).

Loads a checkpoint of a model for scikit-learn's bundled digits (1x8x8, 17 grey levels; the main
job's ``best.ckpt``), dequantizes the first ``--images`` digits with seeded noise and compares the
model under ``torch.autocast(bfloat16)`` with the same model in float32. Under autocast only the
coupling networks run in bfloat16 (glowlab/flows/precision.py), so what moves is what the
bfloat16 networks compute; decode(encode(x)) under autocast is exact to float32 rounding but where
that rounding moves a network input across a bfloat16 rounding step.

    python benchmarks/mixed_precision.py --ckpt runs/digits/version_0/checkpoints/best.ckpt
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from sklearn.datasets import load_digits

import glowlab

DIGITS_SHAPE, DIGITS_BINS = (1, 8, 8), 17


def measure(ckpt: Path, images: int = 512, seed: int = 0) -> dict[str, float]:
    """The figures printed by ``main`` for the model in ``ckpt`` (CPU, bf16 autocast against float32)."""
    model = glowlab.load(ckpt)
    if tuple(model.image_shape) != DIGITS_SHAPE or model.n_bins != DIGITS_BINS:
        raise SystemExit(
            f"{ckpt}: a model of {tuple(model.image_shape)} images with {model.n_bins} bins; this benchmark "
            f"needs one trained on the digits ({DIGITS_SHAPE}, {DIGITS_BINS} bins)"
        )
    levels = torch.tensor(load_digits().images[:images], dtype=torch.long)[:, None]  # (N, 8, 8) -> (N, 1, 8, 8)
    noise = torch.rand(levels.shape, generator=torch.Generator().manual_seed(seed))
    x, _ = model.dequantize(levels, noise)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        zs, logdet = model.encode(x)
        log_prob = model.log_prob(x)
        with bf16:
            zs_bf16, _ = model.encode(x)
            log_prob_bf16 = model.log_prob(x)
            restored = model.decode(zs_bf16)
    bits = (log_prob_bf16 - log_prob) / (model.num_dims * math.log(2))  # (N,) bits/dim apart
    latent = max(((a - b).norm() / a.norm()).item() for a, b in zip(zs, zs_bf16, strict=True))
    error = (restored - x).abs().flatten(1)  # (N, D)
    figures = {
        "images": float(len(x)),
        "bpd_per_image_abs_difference": bits.abs().mean().item(),
        "bpd_mean_difference": bits.mean().item(),
        "latent_relative_difference": latent,
        "roundtrip_max_error": error.max().item(),
        "roundtrip_median_error": error.median().item(),
        "roundtrip_images_over_1e-4": (error.amax(1) > 1e-4).float().mean().item(),
    }
    bad = [k for k, v in figures.items() if not math.isfinite(v)]
    if bad:
        raise SystemExit(f"{ckpt}: non-finite {', '.join(bad)} (logdet finite: {bool(torch.isfinite(logdet).all())})")
    return figures


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    figures = measure(args.ckpt, args.images)
    print(
        f"{int(figures['images'])} digits, bf16 autocast against float32: bits/dim per image "
        f"{figures['bpd_per_image_abs_difference']:.4f} apart (mean {figures['bpd_mean_difference']:+.5f}), "
        f"latents {figures['latent_relative_difference']:.2%} apart; decode(encode(x)) under autocast: "
        f"max error {figures['roundtrip_max_error']:.2e}, median {figures['roundtrip_median_error']:.1e}, "
        f"{figures['roundtrip_images_over_1e-4']:.1%} of images over 1e-4"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, allow_nan=False))
    return figures


if __name__ == "__main__":
    main()
