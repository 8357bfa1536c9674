"""Callbacks: sample grids, checkpoints, throughput and preemption during training."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from glowlab.console import glowlab_logger
from glowlab.files import write_atomic
from glowlab.flops import StepFlops, device_peak_tflops
from glowlab.images import sample_grid, save_sample_grid


def run_directory(trainer: L.Trainer) -> Path:
    """The run's folder, as ``trainer.log_dir`` gives it but without its broadcast.

    ``trainer.log_dir`` is a collective call under DDP; code that runs on rank 0 only (sample grids,
    result files) must not make it, or the ranks' collectives fall out of step and training hangs.
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        if isinstance(logger, CSVLogger | TensorBoardLogger):
            return Path(logger.log_dir)
        return Path(logger.save_dir or trainer.default_root_dir)
    return Path(trainer.default_root_dir)


class SampleGrid(L.Callback):
    """Saves a PNG grid of samples (one row per temperature, labelled) after validation and at the end of fit.

    Files go to ``<log_dir>/samples/step_NNNNNNN.png`` during training; at the end of fit,
    ``samples/last.png`` shows the final weights (``last.ckpt``) and ``samples/best.png`` the
    weights of the best checkpoint, the ones ``test_after_fit`` tests. A model trained with
    ``ema_decay`` is drawn with its averaged weights, the ones evaluation uses. The latent noise is
    fixed by ``seed`` so successive grids show the same samples improving.

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

    def _save(self, trainer: L.Trainer, model: torch.nn.Module, name: str, key: str = "samples") -> None:
        images = sample_grid(model, self.temperatures, self.per_row, self.seed)
        labels = [f"T={t:g}" for t in self.temperatures]
        # A conditional model's columns are its classes 0, 1, 2, ... (see sample_grid): say so above them.
        classes = [f"y={k % model.num_classes}" for k in range(self.per_row)] if model.num_classes else None
        path = run_directory(trainer) / "samples" / name
        self.last_path = save_sample_grid(images, self.per_row, path, labels, column_labels=classes)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                caption = f"rows: temperature {', '.join(map(str, self.temperatures))}"
                logger.log_image(key, [str(self.last_path)], step=trainer.global_step, caption=[caption])

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self._save(
                trainer, getattr(pl_module, "eval_model", pl_module.model), f"step_{trainer.global_step:07d}.png"
            )

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, getattr(pl_module, "eval_model", pl_module.model), "last.png", "samples/last")
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback is not None else ""
        if best and Path(best).is_file():
            from glowlab.models.io import model_from_checkpoint, read_checkpoint

            model = model_from_checkpoint(read_checkpoint(best), best, pl_module.device)
            self._save(trainer, model, "best.png", "samples/best")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their target and renamed over it: never a truncated ``last.ckpt``.

    Lightning's default writes through a temporary file in ``$TMPDIR``; when that is on another
    filesystem (node-local ``/tmp``, a shared run folder: the usual cluster layout) the final step
    is a copy into the truncated target, and a kill in between leaves a broken checkpoint. Here the
    partial file is always on the target's filesystem and ``os.replace`` makes the switch atomic,
    whatever ``$TMPDIR`` is (or how full it is). Remote paths (``s3://``...) keep Lightning's way.

    References: Falcon et al., PyTorch Lightning, 2019.
    """

    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options: object = None) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_atomic(path, lambda f: torch.save(checkpoint, f))


class GlowCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes ``last.ckpt`` when training stops mid-epoch.

    Lightning saves ``last`` at validation or epoch ends only, so a run that reaches ``max_steps``
    between them would otherwise lose its final steps; this writes them at the end of training.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


FLOP_COUNT_TRIES = 3  # training batches Throughput tries to count FLOPs on, from the second


class Throughput(L.Callback):
    """Logs training images/s and model FLOPs utilisation, averaged over ``window`` optimizer steps.

    Images are counted from the micro-batches each rank sees times the number of ranks; the time is
    wall clock between optimizer steps, so it includes data loading, forward, backward and the step.
    Validation within a window, and what runs with it (checkpoints, sample grids), is left out of
    the time: it would make a training rate depend on how often a run validates.

    The FLOPs of the second training batch's forward and backward pass are counted once
    (:class:`~glowlab.flops.StepFlops`): the first may initialise data-dependent layers (ActNorm),
    and the first two of a process run eagerly whatever fast path follows (a replayed graph
    dispatches nothing to count). The window restarts after the counted batch, which leaves the
    counting's own cost out. Each window then also logs the model TFLOP/s per device,
    ``throughput/tflops_per_sec_per_device``, and where the device's dense peak is known (the GPUs
    of :data:`glowlab.flops.GPUS` at the run's precision, or ``peak_tflops``) the model FLOPs
    utilisation ``throughput/mfu``, a fraction of that peak.

    References: Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", 2022 (appendix B).
    """

    def __init__(self, window: int = 20, peak_tflops: float | None = None) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"Throughput(window={window!r}): give a number of optimizer steps, 1 or more")
        if peak_tflops is not None and not peak_tflops > 0:
            raise ValueError(f"Throughput(peak_tflops={peak_tflops!r}): give the device's peak in TFLOP/s, above 0")
        self.window = window
        self.peak_tflops = peak_tflops
        self._start: float | None = None
        self._images = 0
        self._steps = 0
        self._paused: float | None = None  # when validation within a window started
        self._flops = StepFlops()
        self._flops_tries = 0
        self._batches = 0
        self._counting_batch = False  # whether the batch under way is (or was to be) counted
        self._counted_images = 0
        self.flops_per_image: float | None = None  # once counted
        self.mfu: float | None = None  # the last window's, where the peak is known
        self._peak: float | None = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None and trainer.state.fn == "fit":  # not a validate() run after fit
            self._paused = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # The window resumes with the next training batch: its start moves later by the time spent
        # since validation started (checkpoints are written after validation's own end hooks).
        if self._paused is not None and self._start is not None:
            self._start += time.perf_counter() - self._paused
        self._paused = None
        # Counting costs the batch a Python call per operator; a batch without a backward pass
        # (a step the module skipped) leaves the count to the next, twice at most.
        self._batches += 1
        if self._batches >= 2 and self.flops_per_image is None and self._flops_tries < FLOP_COUNT_TRIES:
            self._flops_tries += 1
            self._counting_batch = True
            self._counted_images = batch[0].shape[0]
            self._flops.start()

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._flops.counting:
            return
        total = self._flops.stop()
        if total == 0:  # nothing counted (no matrix product or convolution ran): no FLOPs figures
            self._flops_tries = FLOP_COUNT_TRIES
            return
        self.flops_per_image = total / self._counted_images
        self._peak = self.peak_tflops or device_peak_tflops(pl_module.device, trainer.precision)
        on = pl_module.device
        device = torch.cuda.get_device_name(on) if on.type == "cuda" else on.type
        against = (
            f"throughput/mfu against {self._peak:g} TFLOP/s ({device}, precision {trainer.precision})"
            if self._peak
            else f"no throughput/mfu: no dense peak known for {device} at precision {trainer.precision} "
            "(Throughput's peak_tflops gives one)"
        )
        rank_zero_only(glowlab_logger().info)(
            f"glowlab: a training step is {self.flops_per_image / 1e9:.4g} GFLOP an image "
            f"(forward and backward, counted on training batch {self._batches}); {against}"
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        counted, self._counting_batch = self._counting_batch, False
        if self._flops.counting:
            self._flops.stop()
        # The first batch includes start-up costs, a counted one the counting: measure from its end.
        if self._start is None or counted:
            self._start, self._images, self._steps = now, 0, 0
            return
        self._images += batch[0].shape[0] * trainer.world_size
        if trainer.fit_loop._should_accumulate():
            return
        self._steps += 1
        if self._steps >= self.window:
            rate = self._images / (now - self._start)
            values = {
                "throughput/images_per_sec": rate,
                "throughput/images_per_sec_per_device": rate / trainer.world_size,
            }
            if self.flops_per_image is not None:
                per_device = values["throughput/images_per_sec_per_device"] * self.flops_per_image / 1e12
                values["throughput/tflops_per_sec_per_device"] = per_device
                if self._peak:
                    self.mfu = values["throughput/mfu"] = per_device / self._peak
            for name, value in values.items():
                pl_module.log(name, value, on_step=True, on_epoch=False, rank_zero_only=True)
            self._start, self._images, self._steps = now, 0, 0

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._flops.counting:
            self._flops.stop()


PREEMPTED = "preempted.ckpt"


class Preemption(L.Callback):
    """Checkpoint on ``SIGUSR1`` or ``SIGTERM`` at a batch boundary all ranks agree on; requeue or stop.

    SLURM sends ``SIGUSR1`` shortly before a time limit (``#SBATCH --signal=SIGUSR1@90``) and
    ``SIGTERM`` when it cancels or preempts a job. Either signal only sets a flag; after a
    training batch the ranks combine their flags, all write ``RUN/checkpoints/preempted.ckpt``
    together (``RUN`` is the run's own folder, where its logs and checkpoints are, so no other run
    finds it), and then:

    * ``SIGUSR1`` in a SLURM job: rank 0 runs ``scontrol requeue`` and the processes exit; the
      requeued job (same id, same run folder) resumes from that checkpoint (``slurm/train.sbatch``
      passes it as ``--ckpt_path``).
    * ``SIGUSR1`` outside SLURM, or ``SIGTERM``: the run stops after the checkpoint, without the
      test pass, and says how to resume (``--ckpt_path RUN/checkpoints/preempted.ckpt``).

    Saving inside the signal handler instead, as Lightning's own auto-requeue does, can start the
    checkpoint's collectives while another rank is inside the step's gradient all-reduce. The
    handlers replace Lightning's SIGTERM handling for the fit (Lightning would stop without a
    checkpoint). A single process reads its flag in Python after every batch; under DDP the ranks
    combine their flags every ``check_every_n_steps`` optimizer steps (at the same steps on every
    rank), because the all-reduce makes the host wait for the GPU. SLURM's warning comes about
    90 s ahead, many steps' worth.

    References: Yoo et al., "SLURM: Simple Linux Utility for Resource Management", 2003.
    """

    def __init__(self, signal_name: str = "SIGUSR1", check_every_n_steps: int = 10) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self.signum = getattr(signal, signal_name)
        self.received: int | None = None  # the signal that arrived, if any
        self.saved_path: str | None = None
        self.stopped = False  # the run stopped on a signal (not requeued): no test pass after fit

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning has set its own handlers for the fit (it restores the originals at the end).
        if threading.current_thread() is threading.main_thread():
            for signum in (self.signum, signal.SIGTERM):
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.received = signum

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if trainer.global_step % self.check_every_n_steps:
                return
            # The largest signal number any rank got: SIGTERM (15) outranks SIGUSR1 (10).
            flag = torch.tensor([float(self.received or 0)], device=pl_module.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            received = int(flag.item())
        else:
            received = self.received or 0
        if not received:
            return
        folder = run_directory(trainer) / "checkpoints"
        self.saved_path = str(folder / PREEMPTED)
        trainer.save_checkpoint(self.saved_path)
        name = signal.Signals(received).name
        job = os.environ.get("SLURM_JOB_ID")
        requeue = bool(job) and received == self.signum
        if trainer.is_global_zero:
            print(f"glowlab: {name} received; checkpoint {self.saved_path} at step {trainer.global_step}", flush=True)
            if requeue:
                array = os.environ.get("SLURM_ARRAY_JOB_ID")
                job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
                result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                print(
                    f"glowlab: scontrol requeue {job}: {'done' if result.returncode == 0 else result.stderr.strip()}",
                    flush=True,
                )
            else:
                print(f"glowlab: stopping; resume with --ckpt_path {self.saved_path}", flush=True)
        if requeue:
            raise SystemExit(0)  # the requeued job continues from the checkpoint
        self.stopped = True
        trainer.should_stop = True
