"""LightningCLI for glowlab's Lightning subcommands (fit, validate, test, predict)."""

from __future__ import annotations

import json

from lightning.pytorch.cli import LightningCLI

from glowlab.training.callbacks import run_directory


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
            "num_test_images": self.datamodule.split_size(self.datamodule.test_split) - self.datamodule.skipped_samples,
            "skipped": self.datamodule.skipped_samples,
            "data": self.datamodule.root,
            "checkpoint": checkpoint,
        }
        path = run_directory(self.trainer) / "test_results.json"
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"test bits/dim {results['test_bpd']:.4f} on {results['num_test_images']} images -> {path}")
