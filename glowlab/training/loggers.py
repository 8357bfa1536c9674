"""Loggers that suit clusters: W&B offline by default and resumable by run id, CSV that survives restarts."""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class GlowWandbLogger(WandbLogger):
    """WandbLogger that runs offline unless ``WANDB_MODE`` is set, and continues a run by its id.

    Compute nodes usually have no network: runs are written under ``save_dir/wandb/offline-run-*``
    and uploaded later with ``wandb sync``. The run id is ``id``, else ``$WANDB_RUN_ID``; with an
    id, a restarted job (``slurm/train.sbatch`` passes ``<run name>-<job id>``, which a requeued job
    keeps) appends to the same W&B run instead of starting a new one.

    References: Biewald, "Experiment Tracking with Weights and Biases", 2020.
    """

    def __init__(
        self,
        save_dir: str = "runs",
        project: str = "glowlab",
        name: str | None = None,
        id: str | None = None,  # W&B's own name for it
        log_model: bool = False,
        **kwargs: Any,
    ) -> None:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.makedirs(save_dir, exist_ok=True)
        run_id = id or os.environ.get("WANDB_RUN_ID")
        super().__init__(
            save_dir=save_dir, project=project, name=name, id=run_id, resume="allow", log_model=log_model, **kwargs
        )


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued, not deleted."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose ``metrics.csv`` survives a restart in the same folder.

    Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts; a requeued SLURM job
    logs to its folder again, so this one appends instead and the file holds the whole run.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
