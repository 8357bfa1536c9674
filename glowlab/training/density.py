"""The density lab's Lightning layer: vector data sets, the maximum-likelihood module, plots."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric

from glowlab.data.tabular import SPLITS, load_vector_splits, standardise
from glowlab.flows.base import check_option
from glowlab.models.density import FlowModel, VectorFlowConfig
from glowlab.plots import density_panel, plot_bound
from glowlab.training.callbacks import run_directory
from glowlab.training.module import (
    OPTIMIZERS,
    EpochMeans,
    GuardedTraining,
    NonFiniteGuard,
    NonFiniteTraining,
    OptimizerName,
    check_training_options,
    optimizer_with_warmup,
)


class VectorDataModule(L.LightningDataModule):
    """Vectors for density estimation: a toy data set generated in code, or a user's npz/CSV file.

    ``source`` is one of the toy names (``moons``, ``circles``, ``checkerboard``, ``8gaussians``,
    ``pinwheel``, ``spirals``; ``n_train``/``n_val``/``n_test`` points drawn with ``seed``) or a path.
    The data is small and lives in memory; it is read once at construction so that its dimension
    and training-set statistics (``features``, ``mean``, ``std``) can configure the model.
    ``batch_size`` is per device.

    References: Papamakarios et al., "Masked Autoregressive Flow for Density Estimation", NeurIPS 2017.
    """

    def __init__(
        self,
        source: str = "moons",
        n_train: int = 20000,
        n_val: int = 2000,
        n_test: int = 5000,
        batch_size: int = 256,
        eval_batch_size: int = 2048,
        standardize: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.splits, self.name = load_vector_splits(source, n_train, n_val, n_test, seed)
        for split in SPLITS:
            if len(self.splits.get(split, ())) == 0:
                raise ValueError(f"data.source={source!r}: the {split} split is empty")
        _, mean, std = standardise(self.splits)
        d = self.splits["train"].shape[1]
        self.mean = [float(v) for v in mean] if standardize else [0.0] * d
        self.std = [float(v) for v in std] if standardize else [1.0] * d

    @property
    def features(self) -> int:
        """D, the dimension of one vector."""
        return int(self.splits["train"].shape[1])

    def tensor(self, split: str) -> Tensor:
        """One split as a float32 tensor (N, D)."""
        if split not in self.splits:
            raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
        return torch.from_numpy(np.ascontiguousarray(self.splits[split], dtype=np.float32))

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            TensorDataset(self.tensor(split)), batch_size=batch_size, shuffle=shuffle, generator=generator
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)


class DensityModule(GuardedTraining, L.LightningModule):
    """Trains a :class:`~glowlab.models.density.FlowModel` of any family by maximum likelihood.

    The loss is the mean negative log-likelihood in nats per vector, of the data in its own units:
    the data's standardisation (``flow.mean``, ``flow.std``, from the data module) is the flow's
    first layer. ``flow`` is the model's config (:class:`~glowlab.models.density.VectorFlowConfig`;
    ``model.flow.*`` on the command line), stored in checkpoints.

    References: Papamakarios et al., "Normalizing Flows for Probabilistic Modeling and Inference", JMLR 2021.
    """

    def __init__(
        self,
        flow: VectorFlowConfig = VectorFlowConfig(),
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__()
        check_option("model.optimizer", optimizer, tuple(OPTIMIZERS))
        check_training_options(lr, weight_decay, warmup_steps)
        if isinstance(flow, dict):  # a config given (or linked by the CLI) as plain values
            flow = VectorFlowConfig(**flow)
        self.save_hyperparameters()
        self.model = FlowModel.from_config(flow)
        self.eval_metrics = nn.ModuleDict({f"{stage}_nll": MeanMetric() for stage in ("val", "test")})
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self.epoch_means = EpochMeans()
        self._step_loss: Tensor | None = None

    def _nll(self, batch: list[Tensor]) -> Tensor:
        return -self.model.log_prob(batch[0])  # (B,)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        loss = self._nll(batch).mean()
        self.log_training_values({"train_nll": loss}, batch[0].shape[0], "train_nll")
        self._step_loss = loss.detach()
        return loss

    def _eval_step(self, batch: list[Tensor], stage: str) -> None:
        # iResNet's series and CNF's Hutchinson estimates need autograd even when evaluating.
        with torch.enable_grad():
            nll = self._nll(batch).detach()
        if not bool(torch.isfinite(nll).all()):
            raise NonFiniteTraining(
                f"{stage} NLL is not finite for {int((~torch.isfinite(nll)).sum())} of {len(nll)} vectors of a batch: "
                "the model gives them no density or its parameters are broken; no mean is reported over the rest"
            )
        metric = self.eval_metrics[f"{stage}_nll"]
        metric.update(nll)
        self.log(f"{stage}_nll", metric, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> Any:
        return optimizer_with_warmup(self, self.hparams)


class DensityPlots(L.Callback):
    """Writes data / log-density / samples panels of 2-D models to ``<run>/plots`` (and W&B).

    Every ``every_n_validations`` validations and once at the end of training; models of more than
    two dimensions are not plotted.

    References: Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
    Generative Models", ICLR 2019.
    """

    def __init__(self, every_n_validations: int = 5, resolution: int = 128, samples: int = 5000) -> None:
        self.every = every_n_validations
        self.resolution = resolution
        self.samples = samples
        self._validations = 0

    @rank_zero_only
    def _save(self, trainer: L.Trainer, pl_module: DensityModule, name: str) -> None:
        model = pl_module.model
        data = getattr(trainer.datamodule, "splits", {}).get("train")
        if model.features != 2 or data is None:
            return
        path = run_directory(trainer) / "plots" / f"{name}.png"
        stats = density_panel(model, data[:5000], path, plot_bound(data), self.resolution, self.samples)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="density", images=[str(path)], step=trainer.global_step)
            logger.log_metrics({"plot_mass": stats["mass"]}, step=trainer.global_step)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if self._validations % self.every == 0:
            self._save(trainer, pl_module, f"step-{trainer.global_step:06d}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module, "final")
