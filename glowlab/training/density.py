"""The density lab's Lightning layer: vector data sets, the maximum-likelihood module, plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric

from glowlab.data.tabular import load_vectors, split_vectors, standardise
from glowlab.data.toy import TOY_DATASETS, toy_splits
from glowlab.flows.base import FlowSequence, check_option
from glowlab.flows.standardize import Standardize
from glowlab.models.density import FlowModel, make_vector_flow
from glowlab.plots import grid_points, save_heatmap, save_panels, save_scatter
from glowlab.training.callbacks import run_directory
from glowlab.training.module import OPTIMIZERS, optimizer_with_warmup

SPLITS = ("train", "val", "test")


def load_vector_splits(
    source: str, n_train: int, n_val: int, n_test: int, seed: int
) -> tuple[dict[str, np.ndarray], str]:
    """Train/val/test arrays of a toy data set (by name) or of a user's ``.npz``/``.csv`` file.

    Files with ``train``/``val``/``test`` arrays keep their splits (a missing ``val`` or ``test`` is
    carved out of ``train``); a single array is split 80/10/10 with ``seed``. Returns the splits and
    a short name for the data set.
    """
    if source in TOY_DATASETS:
        return toy_splits(source, n_train, n_val, n_test, seed), source
    path = Path(source)
    if path.suffix.lower() not in (".npz", ".csv", ".txt"):
        raise ValueError(
            f"data.source={source!r} is neither a toy data set ({', '.join(TOY_DATASETS)}) nor a .npz/.csv/.txt file"
        )
    arrays = load_vectors(path)
    if "all" in arrays:
        splits = split_vectors(arrays["all"], seed=seed)
    else:
        if "train" not in arrays:
            raise ValueError(f"{path}: has splits {sorted(arrays)} but no 'train'")
        splits = dict(arrays)
        for missing in ("val", "test"):
            if missing not in splits:
                carved = split_vectors(splits["train"], fractions=(0.9, 0.1, 0.0), seed=seed)
                splits["train"], splits[missing] = carved["train"], carved["val"]
    return splits, path.stem


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


class DensityModule(L.LightningModule):
    """Trains a :class:`~glowlab.models.density.FlowModel` of any family by maximum likelihood.

    The loss is the mean negative log-likelihood in nats per vector, of the data in its own units:
    the data's standardisation (``mean``, ``std``, from the data module) is the flow's first layer.
    ``family``, ``layers``, ``hidden_features``, ``hidden_layers`` and ``options`` go to
    :func:`~glowlab.models.density.make_vector_flow`.

    References: Papamakarios et al., "Normalizing Flows for Probabilistic Modeling and Inference", JMLR 2021.
    """

    def __init__(
        self,
        features: int = 2,
        family: str = "maf",
        layers: int = 5,
        hidden_features: int = 64,
        hidden_layers: int = 2,
        options: dict[str, Any] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        check_option("model.optimizer", optimizer, tuple(OPTIMIZERS))
        self.save_hyperparameters()
        body = make_vector_flow(family, features, layers, hidden_features, hidden_layers, options)
        standardize = Standardize(mean if mean is not None else [0.0] * features, std or [1.0] * features)
        self.model = FlowModel(FlowSequence([standardize, *body.layers]), features)
        self.eval_metrics = nn.ModuleDict({f"{stage}_nll": MeanMetric() for stage in ("val", "test")})

    def _nll(self, batch: list[Tensor]) -> Tensor:
        return -self.model.log_prob(batch[0])  # (B,)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        loss = self._nll(batch).mean()
        self.log("train_nll", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch[0].shape[0])
        return loss

    def _eval_step(self, batch: list[Tensor], stage: str) -> None:
        # iResNet's series and CNF's Hutchinson estimates need autograd even when evaluating.
        with torch.enable_grad():
            nll = self._nll(batch).detach()
        metric = self.eval_metrics[f"{stage}_nll"]
        metric.update(nll)
        self.log(f"{stage}_nll", metric, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> Any:
        return optimizer_with_warmup(self, self.hparams)


def plot_bound(points: np.ndarray, margin: float = 1.1) -> float:
    """Half-width of a square window around the origin holding ``points`` (at least 1)."""
    return max(1.0, float(np.abs(points).max()) * margin) if len(points) else 4.0


@torch.no_grad()
def density_panel(
    model: FlowModel,
    data: np.ndarray,
    path: str | Path,
    bound: float,
    resolution: int = 128,
    samples: int = 5000,
    seed: int = 0,
    chunk: int = 4096,
) -> dict[str, float]:
    """Save "data | model log-density | model samples" for a 2-D model and return the grid mass.

    The returned ``mass`` is the model density summed over the plotted window, a quick check that
    the model is normalised (close to 1 when the window holds the data).
    """
    if model.features != 2:
        raise ValueError(f"density plots need 2-D data, got D={model.features}")
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    points, cell_area = grid_points(bound, resolution)
    grid = torch.as_tensor(points, dtype=p.dtype, device=p.device)
    with torch.enable_grad():
        log_density = torch.cat([model.log_prob(part).detach() for part in grid.split(chunk)]).double().cpu().numpy()
    generator = torch.Generator(device=p.device).manual_seed(seed)
    drawn = model.sample(samples, generator=generator).double().cpu().numpy()
    model.train(was_training)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [
        save_scatter(data, path.with_name(path.stem + "-data.png"), bound),
        save_heatmap(
            log_density.reshape(resolution, resolution),
            path.with_name(path.stem + "-logp.png"),
            scale=max(1, 256 // resolution),  # the scatter panels' 256 pixels
            dynamic_range=10.0,
        ),
        save_scatter(drawn, path.with_name(path.stem + "-samples.png"), bound),
    ]
    save_panels(parts, path, labels=["data", "log density", "samples"])
    finite = np.isfinite(log_density)
    return {"mass": float(np.exp(log_density[finite]).sum() * cell_area)}


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
