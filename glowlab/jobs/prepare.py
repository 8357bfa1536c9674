"""``glowlab prepare``: an image source written as WebDataset shards and a manifest (no torch needed)."""

from __future__ import annotations

from pathlib import Path

from glowlab.data.prepare import PAYLOADS, RESAMPLE, PrepareOptions, prepare
from glowlab.data.sources import SOURCES, load_source
from glowlab.jobs.args import job_parser


def main(argv: list[str]) -> dict:
    """``glowlab prepare``: write an image source as WebDataset shards and a manifest."""
    parser = job_parser("glowlab prepare", main.__doc__)
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
    parser.add_argument("--attributes", help="folder sources: CelebA-style attribute table (list_attr_celeba.txt)")
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    parser.add_argument("--overwrite", action="store_true", help="replace a different earlier preparation in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.source != "digits" and args.path is None:
        parser.error(f"source {args.source} needs a path")
    # A data set for glowlab fit needs validation and test images; the library's prepare() allows
    # empty splits for other uses (a reference set for FID, say).
    if args.val_fraction == 0:
        parser.error("--val-fraction 0 leaves no validation images, which glowlab fit needs (best.ckpt, val_bpd)")
    if args.test_fraction == 0 and args.source not in ("cifar10", "cifar100"):
        parser.error("--test-fraction 0 leaves no test images, which glowlab test and test_after_fit need")
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
    source = load_source(args.source, args.path, args.channels, args.attributes)
    out = args.out or Path("data") / args.source
    manifest = prepare(source, out, options, workers=args.workers, overwrite=args.overwrite, progress=not args.quiet)
    counts = ", ".join(f"{k} {v['count']}" for k, v in manifest["splits"].items())
    print(f"{out}: {counts} images of shape {tuple(manifest['image_shape'])}")
    return manifest
