"""The ``glowlab`` command: LightningCLI subcommands plus ``glowlab sample``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI

from glowlab.training.callbacks import sample_grid, save_sample_grid
from glowlab.training.datamodule import ImageArrayDataModule
from glowlab.training.module import GlowModule

DESCRIPTION = """glowlab: train and evaluate multiscale Glow models.

subcommands: fit, validate, test, predict (LightningCLI; see `glowlab fit --help`) and
sample (`glowlab sample --help`: a PNG grid from a checkpoint)."""


class GlowCLI(LightningCLI):
    """LightningCLI with the data's image shape and bin count wired into the model.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def add_arguments_to_parser(self, parser) -> None:
        # The data decides what the model sees: one source of truth for shape and quantization.
        parser.link_arguments("data.image_shape", "model.image_shape", apply_on="instantiate")
        parser.link_arguments("data.n_bins", "model.n_bins", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, evaluate the best checkpoint (by val_bpd) on the test split.",
        )

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        checkpoint = self.trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)
        self._write_test_results(best or "final weights")

    def after_test(self) -> None:
        self._write_test_results(str(self.config[self.subcommand].get("ckpt_path")))

    def _write_test_results(self, checkpoint: str) -> None:
        if not self.trainer.is_global_zero or "test_bpd" not in self.trainer.callback_metrics:
            return
        results = {
            "test_bpd": float(self.trainer.callback_metrics["test_bpd"]),
            "num_test_images": len(self.datamodule.datasets["test"]),
            "checkpoint": checkpoint,
        }
        path = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "test_results.json"
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"test bits/dim {results['test_bpd']:.4f} on {results['num_test_images']} images -> {path}")


def sample_main(argv: list[str]) -> Path:
    """``glowlab sample``: a PNG grid of samples from a checkpoint, one row per temperature."""
    parser = argparse.ArgumentParser(prog="glowlab sample", description=sample_main.__doc__)
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint written by glowlab fit")
    parser.add_argument("--num-samples", type=int, default=64, help="samples per temperature")
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.7], help="one or more temperatures")
    parser.add_argument("--out", type=Path, default=Path("samples.png"), help="output PNG")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent noise")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
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


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``glowlab`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sample"]:
        sample_main(argv[1:])
        return
    GlowCLI(
        GlowModule,
        ImageArrayDataModule,
        args=argv,
        parser_kwargs={"description": DESCRIPTION},
        save_config_kwargs={"overwrite": False},
    )


if __name__ == "__main__":
    main()
