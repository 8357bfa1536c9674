"""LightningCLIs for glowlab's Lightning subcommands (fit, validate, test, predict)."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Literal

import lightning as L
import yaml
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO

from glowlab.console import quiet_console
from glowlab.files import write_json
from glowlab.models import MultiscaleConfig
from glowlab.models.contract import mismatch
from glowlab.models.density import VectorFlowConfig
from glowlab.models.multiscale import RENAMED
from glowlab.threads import apply_threads
from glowlab.training.callbacks import AtomicCheckpointIO, Preemption, run_directory
from glowlab.training.loggers import RunRecord, recorded_wandb_run
from glowlab.training.progress import RunClock, RunProgress


def _check_writable(folder: Path) -> None:
    """Create ``folder`` if needed; an error naming it when the run could not write there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".glowlab-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exn:
        raise ValueError(f"{folder}: the run cannot write its logs and checkpoints there ({exn.strerror})") from exn


def _processes_per_node(trainer: Any) -> int:
    """How many processes of the run share one node's cores: the trainer's devices (``auto``: every GPU, or 1)."""
    devices = trainer.get("devices")
    if isinstance(devices, list | tuple):
        return max(1, len(devices))
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    import torch

    on_gpu = str(trainer.get("accelerator") or "auto") in ("auto", "gpu", "cuda")
    return max(1, torch.cuda.device_count()) if on_gpu and torch.cuda.is_available() else 1


def run_of_checkpoint(ckpt_path: str | Path) -> Path | None:
    """The run folder a checkpoint was written in (``RUN/checkpoints/X.ckpt`` with ``RUN/config.yaml``), or None."""
    path = Path(ckpt_path)
    if path.parent.name != "checkpoints" or not (path.parent.parent / "config.yaml").is_file():
        return None
    return path.parent.parent


def moved_key_message(args: list[str] | None, config_class: type) -> str | None:
    """A message for a model option given by its old name, or None.

    The model's options became one config object, ``model.flow``: ``model.levels`` is now
    ``model.flow.levels``, and ``flow.step`` / ``flow.memory`` are ``flow.architecture`` /
    ``flow.backprop``. Looks at ``--model.X`` arguments and at the ``model`` section of every
    ``--config`` file, so an old config fails with the new key named, not a parser error.
    """
    fields = {f.name for f in dataclasses.fields(config_class)}
    args = sys.argv[1:] if args is None else [str(a) for a in args]
    found: list[str] = []
    for i, arg in enumerate(args):
        if arg.startswith("--model."):
            found.append(arg[2:].split("=", 1)[0])
        if arg in ("--config", "-c") and i + 1 < len(args) and Path(args[i + 1]).is_file():
            section = (yaml.safe_load(Path(args[i + 1]).read_text()) or {}).get("model") or {}
            if isinstance(section, dict):
                found += [f"model.{key}" for key in section]
                flow = section.get("flow") or {}
                if isinstance(flow, dict):
                    found += [f"model.flow.{key}" for key in flow]
    for key in found:
        parts = key.split(".")
        if len(parts) == 2 and (parts[1] in fields or parts[1] in RENAMED):
            name = RENAMED.get(parts[1], parts[1])
            return f"{key} is now model.flow.{name} (the model's options are one config object, model.flow)"
        if len(parts) == 3 and parts[1] == "flow" and parts[2] in RENAMED:
            return f"{key} is now called model.flow.{RENAMED[parts[2]]}"
    return None


class ResultsCLI(LightningCLI):
    """LightningCLI with ``--test_after_fit`` and a ``test_results.json`` in the run folder.

    Subclasses name the monitored ``metric``, the model's config class (``model.flow``) and describe
    the data in :meth:`results`; an option given by its old name stops with the new name.

    References: Falcon et al., PyTorch Lightning, 2019.
    """

    metric = "test_bpd"
    flow_config: type = MultiscaleConfig
    small_model = False  # `threads: auto` gives small models one thread

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        quiet_console()
        # The progress bar's first line gives the model and its size; Lightning's table is opt-in.
        kwargs["trainer_defaults"] = {"enable_model_summary": False, **(kwargs.get("trainer_defaults") or {})}
        super().__init__(*args, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[L.Callback]) -> L.Trainer:
        """The trainer with glowlab's run callbacks: one progress bar, the run clock, the W&B record."""
        given = [*(config.get("callbacks") or []), *callbacks]
        extra: list[L.Callback] = []
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            extra.append(RunProgress())
        if not any(isinstance(c, RunClock) for c in given):
            extra.append(RunClock())
        if not any(isinstance(c, RunRecord) for c in given):
            # The whole resolved config (data, trainer, seed, model), for the W&B run's config.
            config_now = self.config[self.subcommand] if self.subcommand else self.config
            resolved = yaml.safe_load(self._parser(self.subcommand).dump(config_now, skip_none=False))
            extra.append(RunRecord(resolved))
        return super()._instantiate_trainer(config, [*callbacks, *extra])

    def parse_arguments(self, parser, args) -> None:
        message = moved_key_message(args if isinstance(args, list | tuple) or args is None else [], self.flow_config)
        if message is not None:
            parser.error(message)
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--threads",
            type=int | Literal["auto"],
            default="auto",
            help="CPU threads of torch in each process: an integer, or auto (OMP_NUM_THREADS if set; else "
            + (
                "1, for these small models)."
                if self.small_model
                else "the cores this process may use, divided among the processes of a multi-device run on this node)."
            ),
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help=f"After fit, test the best checkpoint (by {self.metric.replace('test', 'val')}).",
        )

    def before_instantiate_classes(self) -> None:
        """Evaluations of a run's checkpoint log into that run; folders to write must be writable.

        ``validate``/``test`` with ``--ckpt_path RUN/checkpoints/NAME.ckpt`` write their
        ``metrics.csv``, ``config.yaml`` and ``test_results.json`` into ``RUN/test-NAME/`` (or
        ``validate-NAME``) instead of a new ``version_N`` folder, and continue the W&B run that
        ``RUN/wandb.json`` records instead of starting one. An unwritable folder: one line.
        """
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        trainer = config.get("trainer") or {}
        self._apply_threads(config.get("threads", "auto"), trainer)
        loggers = trainer.get("logger")
        if subcommand in ("validate", "test") and config.get("ckpt_path"):
            self._log_into_run(config["ckpt_path"], loggers)
        folders = [trainer.get("default_root_dir") or "."]
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init = getattr(logger, "init_args", None) or (logger.get("init_args") if isinstance(logger, dict) else None)
            save_dir = getattr(init, "save_dir", None) if init is not None else None
            if save_dir:
                folders.append(save_dir)
        for folder in folders:
            _check_writable(Path(folder))

    def _apply_threads(self, value: int | str, trainer: Any) -> None:
        """``--threads`` before the model and data exist; every process of a DDP run applies it."""
        try:
            apply_threads(value, processes=_processes_per_node(trainer), small_model=self.small_model)
        except ValueError as exn:
            raise ValueError(f"--{exn}") from exn

    def _log_into_run(self, ckpt_path: str, loggers: Any) -> None:
        run = run_of_checkpoint(ckpt_path)
        if run is None:
            return
        record = recorded_wandb_run(run)
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init = getattr(logger, "init_args", None)
            class_path = str(getattr(logger, "class_path", ""))
            if init is None:
                continue
            if class_path.endswith("CSVLogger"):
                # CSVLogger's folder is save_dir/name/version: RUN/test-best here.
                init.save_dir, init.name, init.version = str(run), "", f"{self.subcommand}-{Path(ckpt_path).stem}"
            elif class_path.endswith("WandbLogger") and record and not getattr(init, "id", None):
                if not os.environ.get("WANDB_RUN_ID"):
                    init.id = record["id"]
                    # Beside the run's other W&B folders (SAVE_DIR/wandb/offline-run-*), wherever this runs from.
                    folder = Path(record.get("folder") or "")
                    if folder.is_absolute() and folder.parent.name == "wandb":
                        init.save_dir = str(folder.parent.parent)

    def _parse_ckpt_path(self) -> None:
        """The model options of a ``--ckpt_path`` checkpoint replace the command line's, saying which.

        The checkpoint's weights only fit the model they were trained as, so its options win; each
        one that differs from the command line or config is named on one line. (How activations are
        stored or recomputed, ``backprop`` and ``memory_format``, stays as given: it changes no
        weight.) A file that is no glowlab checkpoint stops here with its name. The data contract
        (image shape, grey levels) is checked against the data once the data module exists.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        from glowlab.models.io import config_from_hparams, read_checkpoint

        stored = config_from_hparams(read_checkpoint(ckpt_path)["hyper_parameters"], ckpt_path)
        if not isinstance(stored, self.flow_config):
            raise ValueError(f"--ckpt_path {ckpt_path}: a checkpoint of another kind of model")
        given = self.config[subcommand]["model"]["flow"]
        data_fields = {"image_shape", "n_bins", "features", "mean", "std"}  # filled from the data
        replaced = []
        for field in dataclasses.fields(stored):
            if field.name in data_fields or field.name in ("backprop", "memory_format"):
                continue
            value = getattr(stored, field.name)
            if getattr(given, field.name, value) != value:
                replaced.append(f"model.flow.{field.name}={value!r} (given {getattr(given, field.name)!r})")
            setattr(given, field.name, value)
        if replaced:
            print(f"glowlab: using the checkpoint's {', '.join(replaced)}", file=sys.stderr)
        self._stored_flow = stored

    def _check_ckpt_path(self) -> None:
        """Once the data module exists: a checkpoint for other data stops with the one data-contract message."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        stored = getattr(self, "_stored_flow", None)
        if ckpt_path is None:
            self._refuse_foreign_hpc_checkpoints()
            return
        if not isinstance(stored, MultiscaleConfig):
            return
        data = getattr(self.datamodule, "contract", None)
        if data is not None:
            message = mismatch(stored, data, f"--ckpt_path {ckpt_path}", f"data.root {self.datamodule.root}")
            if message:
                raise ValueError(message)

    def _refuse_foreign_hpc_checkpoints(self) -> None:
        # Under SLURM, Lightning resumes by itself from hpc_ckpt_*.ckpt files in default_root_dir,
        # whichever run wrote them. glowlab writes none (its preemption checkpoints stay in their run's
        # folder), so one found there belongs to another run or an older version: say so, resume nothing.
        if not SLURMEnvironment.detect():
            return
        found = sorted(Path(self.trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))
        if found:
            raise ValueError(
                f"{found[0]}: under SLURM, Lightning would resume this run from it, but it was not written by "
                "this run; move it away, or pass --ckpt_path to resume from a checkpoint on purpose"
            )

    def before_fit(self) -> None:
        self._check_ckpt_path()

    def before_validate(self) -> None:
        self._check_ckpt_path()

    def before_test(self) -> None:
        self._check_ckpt_path()

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        if any(isinstance(c, Preemption) and c.stopped for c in self.trainer.callbacks):
            return  # stopped by a signal: the run is not finished, so not tested either
        checkpoint = self.trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None else ""
        # verbose=False: the one result line below replaces Lightning's table.
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=False)
        self._write_test_results(str(Path(best).resolve()) if best else "final weights")

    def after_test(self) -> None:
        self._write_test_results(str(self.config[self.subcommand].get("ckpt_path")))

    def results(self) -> dict[str, Any]:
        """What the test results file says about the data besides the metric."""
        return {}

    def _write_test_results(self, checkpoint: str) -> None:
        if not self.trainer.is_global_zero or self.metric not in self.trainer.callback_metrics:
            return
        results = {self.metric: float(self.trainer.callback_metrics[self.metric]), **self.results()}
        results["checkpoint"] = checkpoint
        path = run_directory(self.trainer) / "test_results.json"
        write_json(path, results)
        print(f"{self.metric} {results[self.metric]:.4f} -> {path}")


class GlowCLI(ResultsCLI):
    """LightningCLI with the data's image shape and bin count wired into the model.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def add_arguments_to_parser(self, parser) -> None:
        # The data decides what the model sees: one source of truth for shape and quantization.
        parser.link_arguments("data.image_shape", "model.flow.image_shape", apply_on="instantiate")
        parser.link_arguments("data.n_bins", "model.flow.n_bins", apply_on="instantiate")
        super().add_arguments_to_parser(parser)

    def results(self) -> dict[str, Any]:
        data = self.datamodule
        return {
            "num_test_images": data.split_size(data.test_split) - data.skipped_samples,
            "skipped": data.skipped_samples,
            "data": data.root,
        }


class DensityCLI(ResultsCLI):
    """LightningCLI of the density lab: vector data's dimension and statistics wired into the model.

    References: Papamakarios et al., "Normalizing Flows for Probabilistic Modeling and Inference", JMLR 2021.
    """

    metric = "test_nll"
    flow_config = VectorFlowConfig
    small_model = True

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.features", "model.flow.features", apply_on="instantiate")
        parser.link_arguments("data.mean", "model.flow.mean", apply_on="instantiate")
        parser.link_arguments("data.std", "model.flow.std", apply_on="instantiate")
        super().add_arguments_to_parser(parser)

    def results(self) -> dict[str, Any]:
        data = self.datamodule
        return {
            "num_test_vectors": len(data.splits["test"]),
            "data": data.hparams.source,
            "family": self.model.model.config.family,
        }


def density_trainer_defaults(
    save_dir: str = "runs", name: str = "density", version: str | None = None, plots: bool = True, wandb: bool = True
) -> dict[str, Any]:
    """Trainer settings every density-lab run shares; a config's ``trainer`` section overrides them.

    The checkpoint (best by ``val_nll`` and last), the preemption handler and (with ``plots``) the
    2-D density plots are always attached. Logging goes to ``metrics.csv`` in the run folder and
    (with ``wandb``) to W&B, offline unless ``WANDB_MODE`` says otherwise. Evaluation runs with
    autograd on (``inference_mode`` off) because iResNet and CNF compute log-determinants with it.
    """
    from glowlab.training.callbacks import GlowCheckpoint, Preemption
    from glowlab.training.density import DensityPlots

    csv = {"save_dir": save_dir, "name": name, "version": version}
    run = {"save_dir": save_dir, "project": "glowlab", "name": name}

    callbacks = [
        GlowCheckpoint(monitor="val_nll", mode="min", filename="best", save_last=True),
        Preemption(),
        *([DensityPlots()] if plots else []),
    ]
    return {
        "max_steps": 5000,
        "inference_mode": False,
        "log_every_n_steps": 20,
        "gradient_clip_val": 10.0,
        # CSV first: its folder is the run folder (checkpoints, plots, results).
        "logger": [
            {"class_path": "glowlab.training.ResumableCSVLogger", "init_args": csv},
            *([{"class_path": "glowlab.training.GlowWandbLogger", "init_args": run}] if wandb else []),
        ],
        "callbacks": callbacks,
    }
