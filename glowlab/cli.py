"""The ``glowlab`` command: LightningCLI subcommands plus ``glowlab sample``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glowlab.data.prepare import PAYLOADS, RESAMPLE, PrepareOptions, prepare
from glowlab.data.sources import SOURCES, load_source

DESCRIPTION = """glowlab: train and evaluate multiscale Glow models.

subcommands: fit, validate, test, predict (LightningCLI; see `glowlab fit --help`),
prepare (`glowlab prepare --help`: write a data set as shards) and
sample (`glowlab sample --help`: a PNG grid from a checkpoint)."""


def sample_main(argv: list[str]) -> Path:
    """``glowlab sample``: a PNG grid of samples from a checkpoint, one row per temperature."""
    parser = argparse.ArgumentParser(prog="glowlab sample", description=sample_main.__doc__)
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint written by glowlab fit")
    parser.add_argument("--num-samples", type=int, default=64, help="samples per temperature")
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.7], help="one or more temperatures")
    parser.add_argument("--out", type=Path, default=Path("samples.png"), help="output PNG")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent noise")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    # Torch and Lightning load only for the subcommands that need them: `prepare` starts fast.
    import torch

    from glowlab.training.callbacks import sample_grid, save_sample_grid
    from glowlab.training.module import GlowModule

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.ckpt.is_file():
        parser.error(f"--ckpt {args.ckpt}: no such file")
    if args.num_samples < 1:
        parser.error("--num-samples must be >= 1")
    module = GlowModule.load_from_checkpoint(args.ckpt, map_location=args.device)
    per_row = args.num_samples if len(args.temperature) > 1 else max(1, round(args.num_samples**0.5))
    images = sample_grid(module.model, module.hparams.n_bins, args.temperature, args.num_samples, args.seed)
    path = save_sample_grid(images, per_row, args.out)
    print(f"wrote {len(images)} samples at temperature(s) {', '.join(map(str, args.temperature))} -> {path}")
    return path


def prepare_main(argv: list[str]) -> dict:
    """``glowlab prepare``: write an image source as WebDataset shards and a manifest."""
    parser = argparse.ArgumentParser(prog="glowlab prepare", description=prepare_main.__doc__)
    parser.add_argument("source", choices=SOURCES, help="kind of source")
    parser.add_argument("path", nargs="?", help="the source's file or folder (not for digits)")
    parser.add_argument("--out", type=Path, help="output folder (default: data/SOURCE)")
    parser.add_argument("--resolution", type=int, help="resize the shorter side and centre-crop to this size")
    parser.add_argument("--resample", choices=RESAMPLE, default="box", help="downsampling filter (antialiased)")
    parser.add_argument("--payload", choices=PAYLOADS, default="png", help="lossless image encoding in the shards")
    parser.add_argument("--shard-size", type=int, default=5000, help="images per shard")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the training images for validation")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share for test (ignored for CIFAR: official)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    parser.add_argument("--n-bits", type=int, help="bits per channel to train with, recorded as a hint")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3, help="folder sources: grey or RGB")
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    parser.add_argument("--overwrite", action="store_true", help="replace a different earlier preparation in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.source != "digits" and args.path is None:
        parser.error(f"source {args.source} needs a path")
    options = PrepareOptions(
        resolution=args.resolution,
        resample=args.resample,
        payload=args.payload,
        shard_size=args.shard_size,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        n_bits_hint=args.n_bits,
    )
    source = load_source(args.source, args.path, args.channels)
    out = args.out or Path("data") / args.source
    manifest = prepare(source, out, options, workers=args.workers, overwrite=args.overwrite, progress=not args.quiet)
    counts = ", ".join(f"{k} {v['count']}" for k, v in manifest["splits"].items())
    print(f"{out}: {counts} images of shape {tuple(manifest['image_shape'])}")
    return manifest


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``glowlab`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sample"]:
        sample_main(argv[1:])
        return
    if argv[:1] == ["prepare"]:
        prepare_main(argv[1:])
        return
    from glowlab.training.cli import GlowCLI
    from glowlab.training.datamodule import ShardDataModule
    from glowlab.training.module import GlowModule

    GlowCLI(
        GlowModule,
        ShardDataModule,
        args=argv,
        parser_kwargs={"description": DESCRIPTION},
        save_config_kwargs={"overwrite": False},
    )


if __name__ == "__main__":
    main()
