"""``glowlab evaluate {bpd,fid,fid-merge,train-classifier}``: numbers for a trained model, as JSON."""

from __future__ import annotations

import argparse
import math

from glowlab.jobs.args import job_parser


def main(argv: list[str]) -> dict:
    """``glowlab evaluate {bpd,fid,fid-merge,train-classifier}``: numbers for a checkpoint, as JSON."""
    parser = job_parser("glowlab evaluate", main.__doc__)
    jobs = parser.add_subparsers(dest="job", required=True)

    def model_and_data(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--ckpt", required=True, help="checkpoint of glowlab fit, or an exported model folder")
        sub.add_argument("--data", required=True, help="prepared data folder (or URL / pipe: prefix)")

    bpd = jobs.add_parser(
        "bpd",
        help="bits/dim over several dequantization draws (mean and standard error)",
    )
    model_and_data(bpd)
    bpd.add_argument("--split", default="test")
    bpd.add_argument("--draws", type=int, default=4, help="dequantization draws per image")
    bpd.add_argument(
        "--importance",
        type=int,
        metavar="K",
        help="also the importance-weighted bound -log mean_k p(x + u_k) / q(u_k) over K draws (sets --draws K)",
    )
    bpd.add_argument("--batch-size", type=int, default=256)
    bpd.add_argument("--devices", default="1", help="devices for DDP (an int, or 'auto')")
    bpd.add_argument("--accelerator", default="auto")
    bpd.add_argument("--num-workers", type=int, default=0)
    bpd.add_argument("--out", default="bpd.json")

    fid = jobs.add_parser("fid", help="FID of generated samples against real images")
    model_and_data(fid)
    fid.add_argument("--num-samples", type=int, default=10000)
    fid.add_argument("--temperature", type=float, default=1.0)
    fid.add_argument(
        "--guidance", type=float, default=0.0, help="classifier-free guidance (class-conditional transformer flows)"
    )
    fid.add_argument(
        "--split",
        default="train",
        help="real images to compare with; the real-vs-real reference takes held-out images from test (else val)",
    )
    fid.add_argument("--features", choices=("inception", "classifier"), default="inception")
    fid.add_argument("--inception-weights", help="torch-fidelity InceptionV3 weights (default: the torch hub cache)")
    fid.add_argument("--classifier", help="feature classifier (default: DATA/fid_classifier.pt)")
    fid.add_argument("--real-limit", type=int, help="use at most this many real images")
    fid.add_argument("--batch-size", type=int, default=100)
    fid.add_argument("--seed", type=int, default=0)
    fid.add_argument("--part", type=int, default=0, help="this process's share, 0..parts-1 (array jobs, GPUs)")
    fid.add_argument("--parts", type=int, default=1)
    fid.add_argument("--cache-dir", help="real-image statistics cache (default ~/.cache/glowlab/fid)")
    fid.add_argument("--device")
    fid.add_argument("--out", help="JSON (or, with --parts > 1, this part's .pt statistics)")

    merge = jobs.add_parser("fid-merge", help="combine the statistics of `fid --parts N` runs")
    merge.add_argument("parts", nargs="+", help="the part files")
    merge.add_argument("--out", default="fid.json")

    train = jobs.add_parser(
        "train-classifier",
        help="train the FID feature classifier for a small data set",
    )
    train.add_argument("--data", required=True)
    train.add_argument("--epochs", type=int, default=15)
    train.add_argument(
        "--seed", type=int, default=0, help="initial weights and data order: a seed gives the same weights"
    )
    train.add_argument("--out", help="default: DATA/fid_classifier.pt")

    args = parser.parse_args(argv)
    if args.job == "bpd":
        if not (args.devices == "auto" or (args.devices.isdigit() and int(args.devices) >= 1)):
            parser.error(f"--devices {args.devices!r}: a number of devices >= 1, or auto")
        if args.importance is not None:
            if args.importance < 1:
                parser.error("--importance must be >= 1")
            args.draws = args.importance
        if args.draws < 1:
            parser.error("--draws must be >= 1")
        from glowlab.jobs.bpd import evaluate_bpd

        return evaluate_bpd(
            ckpt=args.ckpt,
            data_root=args.data,
            split=args.split,
            draws=args.draws,
            batch_size=args.batch_size,
            devices=int(args.devices) if args.devices.isdigit() else args.devices,
            accelerator=args.accelerator,
            out=args.out,
            num_workers=args.num_workers,
            importance=args.importance is not None,
        )
    if args.job == "fid":
        from glowlab.jobs.fid import evaluate_fid

        if args.num_samples < 2:
            parser.error("--num-samples must be >= 2 (FID needs a covariance)")
        if not (math.isfinite(args.temperature) and args.temperature >= 0):
            parser.error(f"--temperature {args.temperature}: a finite number >= 0")

        return evaluate_fid(
            ckpt=args.ckpt,
            data_root=args.data,
            num_samples=args.num_samples,
            temperature=args.temperature,
            guidance=args.guidance,
            split=args.split,
            features=args.features,
            inception_weights_path=args.inception_weights,
            classifier=args.classifier,
            batch_size=args.batch_size,
            seed=args.seed,
            part=args.part,
            parts=args.parts,
            real_limit=args.real_limit,
            cache_dir=args.cache_dir,
            out=args.out or ("fid.json" if args.parts == 1 else None),
            device=args.device,
        )
    if args.job == "fid-merge":
        from glowlab.jobs.fid import merge_fid

        return merge_fid(args.parts, out=args.out)
    from glowlab.jobs.classifier import train_classifier

    result = train_classifier(args.data, epochs=args.epochs, seed=args.seed, out=args.out)
    print(
        f"feature classifier -> {result['path']} (val accuracy {result['val_accuracy']:.3f} on "
        f"{result['val_images']} images, seed {result['seed']}, {result['epochs']} epochs, "
        f"sha256 {result['sha256'][:12]})"
    )
    return result
