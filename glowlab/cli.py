"""The ``glowlab`` command: LightningCLI subcommands plus ``glowlab sample``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glowlab.data.prepare import PAYLOADS, RESAMPLE, PrepareOptions, prepare
from glowlab.data.sources import SOURCES, load_source

DESCRIPTION = """glowlab: train and evaluate multiscale Glow models.

subcommands: fit, validate, test, predict (LightningCLI; see `glowlab fit --help`), and
  prepare       write a data set as WebDataset shards (`glowlab prepare --help`)
  sample        PNG grids over temperatures or classes
  evaluate      bpd | fid | fid-merge | train-classifier, results as JSON
  interpolate   latent interpolation between real images
  manipulate    attribute directions in latent space
  score         per-sample log-likelihood and bits/dim (anomaly scoring), as CSV
density lab (flows over vectors; see docs/density-lab.md):
  density       fit, validate, test a vector flow (LightningCLI; `glowlab density fit --help`)
  lab           train families x data sets, write the held-out NLL table and plots
  fit-target    fit a flow to an unnormalised 2-D density by reverse KL
  distill       train an IAF student from a MAF teacher's density"""


def sample_main(argv: list[str]) -> Path:
    """``glowlab sample``: a PNG grid of samples from a checkpoint.

    One row per temperature (the same noise scaled by each), or with ``--classes`` one row per
    class of a conditional model. ``--seed`` fixes the grid.
    """
    parser = argparse.ArgumentParser(prog="glowlab sample", description=sample_main.__doc__)
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint written by glowlab fit")
    parser.add_argument("--num-samples", type=int, default=64, help="samples per temperature (or per class)")
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.7], help="e.g. 0 0.5 0.6 0.7 0.8 0.9 1")
    parser.add_argument("--classes", type=int, nargs="+", help="conditional models: one row per class")
    parser.add_argument("--out", type=Path, default=Path("samples.png"), help="output PNG")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent noise")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--wandb-project", help="also log the grid to this W&B project (offline unless WANDB_MODE)")
    args = parser.parse_args(argv)
    if not args.ckpt.is_file():
        parser.error(f"--ckpt {args.ckpt}: no such file")
    if args.num_samples < 1:
        parser.error("--num-samples must be >= 1")
    # Torch and Lightning load only for the subcommands that need them: `prepare` starts fast.
    from glowlab.jobs.common import load_glow, log_to_wandb
    from glowlab.training.callbacks import sample_grid, save_sample_grid

    model, n_bins = load_glow(args.ckpt, args.device)
    rows = len(args.classes) if args.classes else len(args.temperature)
    images = sample_grid(model, n_bins, args.temperature, args.num_samples, args.seed, classes=args.classes)
    per_row = args.num_samples if rows > 1 else max(1, round(args.num_samples**0.5))
    path = save_sample_grid(images, per_row, args.out)
    what = f"classes {args.classes}" if args.classes else f"temperature(s) {', '.join(map(str, args.temperature))}"
    print(f"wrote {len(images)} samples at {what} -> {path}")
    log_to_wandb(
        args.wandb_project, "sample", vars(args) | {"ckpt": str(args.ckpt), "out": str(path)}, {"samples": path}
    )
    return path


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint written by glowlab fit")
    parser.add_argument("--data", required=True, help="prepared data folder (or URL / pipe: prefix)")


def evaluate_main(argv: list[str]) -> dict:
    """``glowlab evaluate {bpd,fid,fid-merge,train-classifier}``: numbers for a checkpoint, as JSON."""
    parser = argparse.ArgumentParser(prog="glowlab evaluate", description=evaluate_main.__doc__)
    jobs = parser.add_subparsers(dest="job", required=True)

    bpd = jobs.add_parser("bpd", help="bits/dim over several dequantization draws (mean and standard error)")
    _data_args(bpd)
    bpd.add_argument("--split", default="test")
    bpd.add_argument("--draws", type=int, default=4, help="dequantization draws per image")
    bpd.add_argument("--batch-size", type=int, default=256)
    bpd.add_argument("--devices", default="1", help="devices for DDP (an int, or 'auto')")
    bpd.add_argument("--accelerator", default="auto")
    bpd.add_argument("--num-workers", type=int, default=0)
    bpd.add_argument("--out", default="bpd.json")

    fid = jobs.add_parser("fid", help="FID of generated samples against real images")
    _data_args(fid)
    fid.add_argument("--num-samples", type=int, default=10000)
    fid.add_argument("--temperature", type=float, default=1.0)
    fid.add_argument("--split", default="train", help="real images to compare with")
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

    train = jobs.add_parser("train-classifier", help="train the FID feature classifier for a small data set")
    train.add_argument("--data", required=True)
    train.add_argument("--epochs", type=int, default=15)
    train.add_argument("--out", help="default: DATA/fid_classifier.pt")

    args = parser.parse_args(argv)
    if args.job == "bpd":
        from glowlab.jobs.bpd import evaluate_bpd

        devices = int(args.devices) if args.devices.isdigit() else args.devices
        return evaluate_bpd(
            args.ckpt,
            args.data,
            args.split,
            args.draws,
            args.batch_size,
            devices,
            args.accelerator,
            args.out,
            args.num_workers,
        )
    if args.job == "fid":
        from glowlab.jobs.fid import evaluate_fid

        return evaluate_fid(
            args.ckpt,
            args.data,
            args.num_samples,
            args.temperature,
            args.split,
            args.features,
            args.inception_weights,
            args.classifier,
            args.batch_size,
            args.seed,
            args.part,
            args.parts,
            args.real_limit,
            args.cache_dir,
            args.out or ("fid.json" if args.parts == 1 else None),
            args.device,
        )
    if args.job == "fid-merge":
        from glowlab.jobs.fid import merge_fid

        return merge_fid(args.parts, args.out)
    from glowlab.jobs.classifier import train_classifier

    result = train_classifier(args.data, epochs=args.epochs, out=args.out)
    print(f"feature classifier -> {result['path']} (val accuracy {result['val_accuracy']:.3f})")
    return result


def interpolate_main(argv: list[str]) -> Path:
    """``glowlab interpolate``: encode real images, interpolate every level's latent, decode, write a strip."""
    parser = argparse.ArgumentParser(prog="glowlab interpolate", description=interpolate_main.__doc__)
    _data_args(parser)
    parser.add_argument("--split", default="test")
    parser.add_argument("--indices", type=int, nargs="+", default=[0, 1], help="images of the split to pass through")
    parser.add_argument("--steps", type=int, default=8, help="images per segment, endpoints included")
    parser.add_argument("--mode", choices=("linear", "slerp"), default="linear")
    parser.add_argument("--label", type=int, help="conditional models: the class (default: the first image's)")
    parser.add_argument("--out", type=Path, default=Path("interpolation.png"))
    parser.add_argument("--device")
    parser.add_argument("--wandb-project")
    args = parser.parse_args(argv)
    if len(args.indices) < 2:
        parser.error("--indices needs at least two images")
    import torch

    from glowlab.data.shards import read_samples
    from glowlab.jobs.common import load_glow, log_to_wandb
    from glowlab.jobs.generate import interpolate, levels_to_model, save
    from glowlab.training.callbacks import display

    model, n_bins = load_glow(args.ckpt, args.device)
    device = next(model.parameters()).device
    samples = read_samples(args.data, args.split, args.indices)
    y = None
    if model.num_classes:
        y = torch.tensor([args.label if args.label is not None else int(samples.labels[0])], device=device)
    frames = interpolate(model, levels_to_model(samples.levels, n_bins, device), args.steps, args.mode, y)
    path = save(display(frames, n_bins), args.steps if len(args.indices) == 2 else len(frames), args.out)
    print(f"wrote {len(frames)} frames through images {args.indices} of {args.split} -> {path}")
    log_to_wandb(args.wandb_project, "interpolate", vars(args) | {"out": str(path)}, {"interpolation": path})
    return path


def manipulate_main(argv: list[str]) -> Path:
    """``glowlab manipulate``: move images along an attribute direction in latent space (Glow, Sec. 5).

    The direction is the mean latent of images with the attribute minus the mean of those without,
    over ``--direction-images`` images of ``--direction-split``. ``--attribute`` is ``class=K``
    (label K) or the name of a binary attribute column recorded by prepare (e.g. ``Smiling``).
    """
    parser = argparse.ArgumentParser(prog="glowlab manipulate", description=manipulate_main.__doc__)
    _data_args(parser)
    parser.add_argument("--attribute", required=True, help="class=K, or an attribute name from the manifest")
    parser.add_argument("--direction-split", default="train")
    parser.add_argument("--direction-images", type=int, default=2000)
    parser.add_argument("--split", default="test", help="where the images to manipulate come from")
    parser.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--strengths", type=float, nargs="+", default=[-1.0, -0.5, 0.0, 0.5, 1.0])
    parser.add_argument("--out", type=Path, default=Path("manipulation.png"))
    parser.add_argument("--device")
    parser.add_argument("--wandb-project")
    args = parser.parse_args(argv)

    from glowlab.data.shards import read_manifest, read_samples
    from glowlab.jobs.common import load_glow, log_to_wandb
    from glowlab.jobs.generate import attribute_direction, levels_to_model, manipulate, save
    from glowlab.training.callbacks import display

    model, n_bins = load_glow(args.ckpt, args.device)
    device = next(model.parameters()).device
    manifest = read_manifest(args.data)
    count = manifest["splits"][args.direction_split]["count"]
    pool = read_samples(args.data, args.direction_split, limit=min(args.direction_images, count))
    if args.attribute.startswith("class="):
        has = pool.labels == int(args.attribute.split("=", 1)[1])
    else:
        names = manifest.get("attribute_names") or []
        if args.attribute not in names:
            parser.error(
                f"--attribute {args.attribute!r}: {args.data} has attributes {names or 'none'}; or use class=K"
            )
        has = pool.attributes[:, names.index(args.attribute)].bool()
    y_pool = pool.labels.to(device) if model.num_classes else None
    direction = attribute_direction(model, levels_to_model(pool.levels, n_bins, device), has.to(device), y_pool)
    chosen = read_samples(args.data, args.split, args.indices)
    y = chosen.labels.to(device) if model.num_classes else None
    images = manipulate(model, levels_to_model(chosen.levels, n_bins, device), direction, args.strengths, y)
    path = save(display(images, n_bins), len(args.strengths), args.out)
    print(f"wrote {len(args.indices)} images x strengths {args.strengths} along {args.attribute} -> {path}")
    log_to_wandb(args.wandb_project, "manipulate", vars(args) | {"out": str(path)}, {"manipulation": path})
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
    parser.add_argument("--attributes", help="folder sources: CelebA-style attribute table (list_attr_celeba.txt)")
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
    source = load_source(args.source, args.path, args.channels, args.attributes)
    out = args.out or Path("data") / args.source
    manifest = prepare(source, out, options, workers=args.workers, overwrite=args.overwrite, progress=not args.quiet)
    counts = ", ".join(f"{k} {v['count']}" for k, v in manifest["splits"].items())
    print(f"{out}: {counts} images of shape {tuple(manifest['image_shape'])}")
    return manifest


def _options(text: str | None) -> dict:
    """``--options`` as JSON (``'{"bins": 16}'``); an error names the option on bad input."""
    import json

    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exn:
        raise ValueError(f"--options is not valid JSON: {exn}") from exn
    if not isinstance(options, dict):
        raise ValueError("--options must be a JSON object, like '{\"bins\": 16}'")
    return options


def _flow_args(parser: argparse.ArgumentParser, family: str) -> None:
    parser.add_argument("--family", default=family, help="flow family (see docs/density-lab.md)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden-features", type=int, default=64)
    parser.add_argument("--hidden-layers", type=int, default=2)
    parser.add_argument("--options", help="family options as JSON, e.g. '{\"bins\": 16}'")


def _reverse_kl_args(parser: argparse.ArgumentParser, steps: int) -> None:
    """Optimisation options shared by the reverse-KL jobs (fit-target, distill)."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wandb-project")


def _reverse_kl_kwargs(args: argparse.Namespace) -> dict:
    return {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "wandb_project": args.wandb_project,
    }


def lab_main(argv: list[str]) -> Path:
    """``glowlab lab``: train each density config on each data set; write the held-out NLL table."""
    from glowlab.data.toy import TOY_DATASETS
    from glowlab.jobs.density import run_lab

    parser = argparse.ArgumentParser(prog="glowlab lab", description=lab_main.__doc__)
    parser.add_argument("--configs", nargs="+", required=True, help="density configs (configs/density/*.yaml)")
    parser.add_argument(
        "--datasets", nargs="+", default=list(TOY_DATASETS), help="toy data set names and/or .npz/.csv files"
    )
    parser.add_argument("--max-steps", type=int, help="override every config's trainer.max_steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--out", default="runs/lab")
    parser.add_argument("--wandb-project")
    args = parser.parse_args(argv)
    return run_lab(
        args.configs, args.datasets, args.out, args.max_steps, args.seed, args.accelerator, args.wandb_project
    )


def fit_target_main(argv: list[str]) -> dict:
    """``glowlab fit-target``: fit a flow to exp(-U) of a built-in 2-D energy by reverse KL."""
    from glowlab.jobs.target import fit_target
    from glowlab.targets import ENERGIES

    parser = argparse.ArgumentParser(prog="glowlab fit-target", description=fit_target_main.__doc__)
    parser.add_argument("--target", required=True, choices=ENERGIES)
    _flow_args(parser, "realnvp")
    _reverse_kl_args(parser, steps=5000)
    parser.add_argument("--anneal-steps", type=int, default=1000, help="inverse temperature 0.01 -> 1 over these")
    parser.add_argument("--out", help="default: runs/target/TARGET-FAMILY")
    args = parser.parse_args(argv)
    return fit_target(
        args.target,
        args.out or f"runs/target/{args.target}-{args.family}",
        family=args.family,
        layers=args.layers,
        hidden_features=args.hidden_features,
        hidden_layers=args.hidden_layers,
        options=_options(args.options),
        anneal_steps=args.anneal_steps,
        **_reverse_kl_kwargs(args),
    )


def distill_main(argv: list[str]) -> dict:
    """``glowlab distill``: an IAF student trained on a MAF teacher's density (one-pass sampling)."""
    from glowlab.jobs.target import distill

    parser = argparse.ArgumentParser(prog="glowlab distill", description=distill_main.__doc__)
    parser.add_argument("--teacher", required=True, help="density-lab checkpoint of a MAF")
    parser.add_argument("--family", help="student family (default: iaf for maf, iaf-spline for maf-spline)")
    _reverse_kl_args(parser, steps=3000)
    parser.add_argument("--out", default="runs/distill")
    args = parser.parse_args(argv)
    return distill(args.teacher, args.out, family=args.family, **_reverse_kl_kwargs(args))


def score_main(argv: list[str]) -> dict:
    """``glowlab score``: per-sample log-likelihood and bits/dim as CSV (see the typical-set caveat in the docs)."""
    from glowlab.jobs.score import score

    parser = argparse.ArgumentParser(prog="glowlab score", description=score_main.__doc__)
    parser.add_argument("--ckpt", required=True, help="image (glowlab fit) or density-lab checkpoint")
    parser.add_argument("--data", required=True, help="prepared image folder, toy data set name or .npz/.csv file")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default="scores.csv")
    args = parser.parse_args(argv)
    return score(args.ckpt, args.data, args.split, args.out)


def density_cli(argv: list[str]) -> None:
    """``glowlab density {fit,validate,test}``: LightningCLI for the vector flows of the density lab."""
    from glowlab.training.cli import DensityCLI, density_trainer_defaults
    from glowlab.training.density import DensityModule, VectorDataModule

    DensityCLI(
        DensityModule,
        VectorDataModule,
        args=argv,
        parser_kwargs={
            "prog": "glowlab density",
            "description": "glowlab density: maximum-likelihood training of vector flows.",
        },
        trainer_defaults=density_trainer_defaults(),
        save_config_kwargs={"overwrite": True},
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``glowlab`` console script."""
    try:
        _run(argv)
    finally:
        _close_distributed()


def _close_distributed() -> None:
    """Destroy the process group a distributed job left behind.

    A gloo group still alive when the interpreter exits can abort the process (``terminate called
    without an active exception``) after its results were written, and SLURM marks the job FAILED.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(argv: list[str] | None) -> None:
    explicit = argv
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {
        "sample": sample_main,
        "prepare": prepare_main,
        "evaluate": evaluate_main,
        "interpolate": interpolate_main,
        "manipulate": manipulate_main,
        "score": score_main,
        "lab": lab_main,
        "fit-target": fit_target_main,
        "distill": distill_main,
    }
    if argv[:1] and argv[0] in commands:
        try:
            commands[argv[0]](argv[1:])
        except (OSError, ValueError, KeyError, RuntimeError) as exn:
            # Problems with files, options or data: one clear line, no traceback.
            print(f"glowlab {argv[0]}: error: {exn}", file=sys.stderr)
            raise SystemExit(2) from exn
        return
    if argv[:1] == ["density"]:
        density_cli(argv[1:])
        return
    from glowlab.training.cli import GlowCLI
    from glowlab.training.datamodule import ShardDataModule
    from glowlab.training.module import GlowModule

    GlowCLI(
        GlowModule,
        ShardDataModule,
        args=None if explicit is None else argv,  # None: LightningCLI reads sys.argv itself
        parser_kwargs={"description": DESCRIPTION},
        # A requeued SLURM job logs to the same folder again: its resolved config is the same.
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
