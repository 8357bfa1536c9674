"""The LightningModule that trains a Glow by maximum likelihood."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from glowlab.likelihood import bits_per_dim
from glowlab.models import Glow

OPTIMIZERS = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax}


class GlowModule(L.LightningModule):
    """Trains :class:`glowlab.models.Glow`; the loss is the negative log-likelihood in bits/dim.

    For class-conditional models (``num_classes``) the loss adds ``class_weight`` times the class
    cross-entropy in bits per image, as in the paper's code. The learning rate warms up linearly over
    ``warmup_steps`` optimizer steps. ``image_shape`` and ``n_bins`` come from the data module when
    run through the ``glowlab`` CLI; they are stored in checkpoints so a model can sample without data.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        n_bins: int = 256,
        levels: int = 3,
        steps: int = 32,
        hidden_channels: int = 512,
        coupling: str = "affine",
        permutation: str = "lu",
        learn_top: bool = True,
        num_classes: int | None = None,
        class_weight: float = 0.01,
        optimizer: str = "adamax",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 1000,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"model.optimizer={optimizer!r} is not one of {', '.join(map(repr, OPTIMIZERS))}")
        if n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {n_bins}")
        self.save_hyperparameters()
        self.model = Glow(
            image_shape=tuple(image_shape),
            levels=levels,
            steps=steps,
            hidden_channels=hidden_channels,
            coupling=coupling,
            permutation=permutation,
            learn_top=learn_top,
            num_classes=num_classes,
        )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        num_classes = self.hparams.num_classes
        if num_classes and datamodule is not None:
            found = getattr(datamodule, "num_classes", None)
            if found is None:
                raise ValueError("model.num_classes is set but the data has no labels")
            if found > num_classes:
                raise ValueError(f"model.num_classes={num_classes} but the data has labels up to {found - 1}")

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        conditional = self.model.num_classes is not None
        out = self.model.evaluate(x, y if conditional else None)
        bpd = bits_per_dim(out.log_prob, self.model.num_dims, self.hparams.n_bins).mean()
        on_step = stage == "train"
        log = dict(on_step=on_step, on_epoch=True, batch_size=x.shape[0], sync_dist=not on_step)
        self.log(f"{stage}_bpd", bpd, prog_bar=True, **log)
        loss = bpd
        if out.class_logits is not None:
            class_loss = F.cross_entropy(out.class_logits, y) / math.log(2.0)  # bits per image
            accuracy = (out.class_logits.argmax(dim=1) == y).float().mean()
            self.log(f"{stage}_class_bits", class_loss, **log)
            self.log(f"{stage}_class_acc", accuracy, **log)
            loss = loss + self.hparams.class_weight * class_loss
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Called before the trainer clips, so this is the raw norm: spikes show here first.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            self.log("grad_norm", norm, on_step=True, on_epoch=False)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = OPTIMIZERS[hp.optimizer](self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        warmup = max(1, hp.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
