"""Loggers that suit clusters: W&B offline by default and resumable by run id, CSV that survives restarts."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only


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
        if self._wandb_init.get("anonymous") is None:
            del self._wandb_init["anonymous"]  # W&B warns about the setting even when it is None


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


WANDB_RECORD = "wandb.json"


class RunRecord(L.Callback):
    """Ties a run folder and its W&B run together: ``RUN/wandb.json``, and the whole config in W&B.

    Lightning gives W&B only the model's hyperparameters; this adds the run's fully resolved
    configuration (data, trainer, seed, ...) as ``config``, so a W&B run says how to reproduce
    it. The run folder records the W&B run's id, project and local folder in ``wandb.json``;
    ``glowlab validate``/``test`` and ``glowlab report`` of a checkpoint in that folder use it to
    attach to the same W&B run instead of starting a new one.

    References: Biewald, "Experiment Tracking with Weights and Biases", 2020.
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = config
        self._announced = False

    @rank_zero_only
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from glowlab.files import write_json
        from glowlab.training.callbacks import run_directory

        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            run = logger.experiment
            if self.config is not None:
                run.config.update({"config": self.config}, allow_val_change=True)
            record = {
                "id": run.id,
                "project": run.project,
                "name": run.name,
                "folder": str(Path(run.dir).parent.resolve()),  # what `wandb sync` takes; absolute: any cwd
                "mode": os.environ.get("WANDB_MODE", "online"),
            }
            write_json(run_directory(trainer) / WANDB_RECORD, record)
            if not self._announced:  # once, though setup runs again for the test after fit
                self._announced = True
                upload = f"; upload with: wandb sync {record['folder']}" if record["mode"] == "offline" else ""
                print(f"glowlab: W&B run {run.id} ({record['mode']}){upload}", file=sys.stderr, flush=True)


def recorded_wandb_run(run_folder: str | Path) -> dict[str, Any] | None:
    """The W&B run a run folder recorded (``wandb.json``), or None."""
    path = Path(run_folder) / WANDB_RECORD
    return json.loads(path.read_text()) if path.is_file() else None
