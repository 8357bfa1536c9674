"""Callbacks: sample grids over temperatures during training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torchvision.utils import save_image

from glowlab.likelihood import to_unit_range
from glowlab.models import Glow


def sample_grid(
    model: Glow,
    n_bins: int,
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
        images = torch.cat([to_unit_range(model.decode([t * z for z in base], y), n_bins) for t, y in rows])
    model.train(was_training)
    images = images.float().cpu()  # (rows * per_row, C, H, W)
    scale = max(1, -(-min_pixels // images.shape[-1]))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    return images


def save_sample_grid(images: Tensor, per_row: int, path: str | Path) -> Path:
    """Write ``images`` (N, C, H, W) in [0, 1] as a PNG grid with ``per_row`` images a row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=per_row, padding=2, pad_value=1.0)
    return path


class SampleGrid(L.Callback):
    """Saves a PNG grid of samples (one row per temperature) after validation and at the end of fit.

    Files go to ``<log_dir>/samples/step_NNNNNNN.png`` and ``<log_dir>/samples/final.png``; the latent
    noise is fixed by ``seed`` so successive grids show the same samples improving.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(
        self,
        temperatures: Sequence[float] = (0.0, 0.5, 0.7, 0.8, 1.0),
        per_row: int = 8,
        every_n_validations: int = 1,
        seed: int = 0,
    ) -> None:
        self.temperatures = tuple(float(t) for t in temperatures)
        self.per_row = per_row
        self.every_n_validations = every_n_validations
        self.seed = seed
        self._validations = 0
        self.last_path: Path | None = None

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        images = sample_grid(pl_module.model, pl_module.hparams.n_bins, self.temperatures, self.per_row, self.seed)
        log_dir = trainer.log_dir or trainer.default_root_dir
        self.last_path = save_sample_grid(images, self.per_row, Path(log_dir) / "samples" / name)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self._save(trainer, pl_module, f"step_{trainer.global_step:07d}.png")

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module, "final.png")


class GlowCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes ``last.ckpt`` when training stops mid-epoch.

    Lightning saves ``last`` at validation or epoch ends only, so a run that reaches ``max_steps``
    between them would otherwise lose its final steps; this writes them at the end of training.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
