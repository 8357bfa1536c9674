"""The LightningModule that trains a Glow by maximum likelihood."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from glowlab.flows.base import check_option
from glowlab.likelihood import bits_per_dim
from glowlab.models import Glow

OPTIMIZERS = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax}


def optimizer_with_warmup(module: nn.Module, hp: Any) -> dict[str, Any]:
    """``hp.optimizer`` over the module's parameters, the learning rate rising linearly over ``hp.warmup_steps``."""
    optimizer = OPTIMIZERS[hp.optimizer](module.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    warmup = max(1, hp.warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class GlowModule(L.LightningModule):
    """Trains :class:`glowlab.models.Glow`; the loss is the negative log-likelihood in bits/dim.

    For class-conditional models (``num_classes``) the loss adds ``class_weight`` times the class
    cross-entropy in bits per image, as in the paper's code. The learning rate warms up linearly over
    ``warmup_steps`` optimizer steps. ``image_shape`` and ``n_bins`` come from the data module when
    run through the ``glowlab`` CLI; they are stored in checkpoints so a model can sample without data.
    ``compile=True`` runs the model's encoding pass (training, validation and test) through
    ``torch.compile``: the elementwise work between convolutions is fused, at the price of a
    compilation per new batch shape; checkpoints are the same as without it.

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
        memory: str = "standard",
        step: str = "glow",
        memory_format: str = "channels_last",
        class_weight: float = 0.01,
        optimizer: str = "adamax",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 1000,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_option("model.optimizer", optimizer, tuple(OPTIMIZERS))
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
            memory=memory,
            step=step,
            memory_format=memory_format,
        )
        # Only the bound method is compiled, so the state_dict keys stay those of the plain model.
        self._evaluate = torch.compile(self.model.evaluate) if compile else self.model.evaluate
        # Evaluation averages per image over all ranks exactly (sums and counts are all-reduced).
        names = ["bpd", "class_bits", "class_acc"] if num_classes else ["bpd"]
        self.eval_metrics = nn.ModuleDict(
            {f"{stage}_{name}": MeanMetric() for stage in ("val", "test") for name in names}
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

    def _step(self, batch: tuple[Tensor, ...], stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        conditional = self.model.num_classes is not None
        out = self._evaluate(x, y if conditional else None)
        values = {"bpd": bits_per_dim(out.log_prob, self.model.num_dims, self.hparams.n_bins)}
        if out.class_logits is not None:
            values["class_bits"] = F.cross_entropy(out.class_logits, y, reduction="none") / math.log(2.0)  # per image
            values["class_acc"] = (out.class_logits.argmax(dim=1) == y).float()
        loss = values["bpd"].mean()
        if "class_bits" in values:
            loss = loss + self.hparams.class_weight * values["class_bits"].mean()
        for name, value in values.items():
            if stage == "train":
                self.log(
                    f"train_{name}",
                    value.mean(),
                    on_step=True,
                    on_epoch=True,
                    batch_size=x.shape[0],
                    prog_bar=name == "bpd",
                )
            else:
                metric = self.eval_metrics[f"{stage}_{name}"]
                metric.update(value)
                self.log(f"{stage}_{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "bpd")
        return loss

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._step(batch, "test")

    def _log_skipped(self) -> None:
        skipped = getattr(self.trainer.datamodule, "skipped_samples", None) if self._trainer is not None else None
        if skipped is not None:
            self.log("data_skipped", float(skipped), reduce_fx="sum", sync_dist=True)

    def on_train_epoch_end(self) -> None:
        self._log_skipped()

    def on_validation_epoch_end(self) -> None:
        self._log_skipped()

    def on_test_epoch_end(self) -> None:
        self._log_skipped()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Called before the trainer clips, so this is the raw norm: spikes show here first.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            self.log("grad_norm", norm, on_step=True, on_epoch=False)

    def configure_optimizers(self) -> Any:
        return optimizer_with_warmup(self, self.hparams)
