"""What a run shows on the console: one progress bar over the whole run, and its wall clock."""

from __future__ import annotations

import math
import sys
import time
from typing import IO, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only

from glowlab.training.callbacks import Throughput


def _clock(seconds: float) -> str:
    """``H:MM:SS``; ``?`` when not known."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunProgress(ProgressBar):
    """One progress bar over the run's optimizer steps, with time left, the training loss and images/s.

    On a terminal it is a tqdm bar over ``max_steps`` (it does not restart each epoch). Elsewhere
    (a log file, a SLURM job's output) it prints a plain line at every tenth of the run and at
    least every ``log_seconds``, never carriage returns. The bar reads the loss from the device at
    most once per ``refresh_seconds`` (reading it is a host synchronisation), not every step.
    Validation results are printed as one line each. ``glowlab fit`` installs it unless
    ``trainer.enable_progress_bar`` is false or the config names another progress bar.

    References: Falcon et al., PyTorch Lightning, 2019.
    """

    def __init__(self, refresh_seconds: float = 1.0, log_seconds: float = 300.0, stream: IO[str] | None = None) -> None:
        super().__init__()
        self.refresh_seconds = refresh_seconds
        self.log_seconds = log_seconds
        self.stream = stream
        self._enabled = True
        self._bar: Any = None
        self._total = 0
        self._first_step = 0
        self._last_step = -1
        self._start = 0.0
        self._last_refresh = 0.0
        self._last_line = 0.0
        self._last_tenth = 0
        self._images = 0
        self._images_since = 0.0
        self._status = ""
        self._paced = (0, 0.0)  # (step, time) of the last progress line: the pace for the time left

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and rank_zero_only.rank == 0

    def _out(self) -> IO[str]:
        return self.stream or sys.stderr

    def _print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self._out())
        else:
            print(text, file=self._out(), flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.is_enabled:
            return
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self._total = int(steps) if math.isfinite(steps) else 0
        self._first_step = self._last_step = trainer.global_step
        self._start = self._last_refresh = self._last_line = self._images_since = time.monotonic()
        self._last_tenth = 10 * self._first_step // self._total if self._total else 0
        self._paced = (self._first_step, self._start)
        model = getattr(pl_module, "model", pl_module)
        parameters = sum(p.numel() for p in model.parameters())  # a weight average's copy not counted twice
        devices = f"{trainer.num_devices} {trainer.accelerator.__class__.__name__.removesuffix('Accelerator').lower()}"
        where = getattr(trainer.loggers[0], "log_dir", None) if trainer.loggers else None
        resumed = f", resuming at step {self._first_step}" if self._first_step else ""
        self._print(
            f"glowlab: {type(model).__name__} with {parameters:,} parameters on {devices} device(s) x "
            f"{trainer.num_nodes} node(s), {torch.get_num_threads()} CPU thread(s) each, {self._total or '?'} "
            f"steps{resumed}" + (f"; run folder {where}" if where else "")
        )
        if self._out().isatty() and self._total:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self._total,
                initial=self._first_step,
                unit="step",
                dynamic_ncols=True,
                file=self._out(),
                smoothing=0.05,
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.is_enabled:
            return
        self._images += len(batch[0]) * trainer.world_size
        step = trainer.global_step
        if step == self._last_step:
            return  # accumulating gradients: no optimizer step yet
        self._last_step = step
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if now - self._last_refresh >= self.refresh_seconds:
                self._bar.set_postfix_str(self._refresh(trainer, now), refresh=False)
            return
        tenth = 10 * step // self._total if self._total else 0
        if tenth > self._last_tenth or now - self._last_line >= self.log_seconds or step == self._total:
            self._last_tenth, self._last_line = tenth, now
            self._print(self._line(trainer, step, now))

    def _refresh(self, trainer: L.Trainer, now: float) -> str:
        """The loss and images/s since the last refresh (one device read), and the last MFU ``Throughput`` logged."""
        metrics = trainer.progress_bar_metrics
        parts = [
            f"{name.removesuffix('_step')} {value:.3f}" for name, value in metrics.items() if name.endswith("_step")
        ]
        rate = self._images / max(now - self._images_since, 1e-9)
        parts.append(f"{rate:,.0f} img/s")
        mfu = next((c.mfu for c in trainer.callbacks if isinstance(c, Throughput) and c.mfu is not None), None)
        if mfu is not None:
            parts.append(f"MFU {mfu:.1%}")
        self._images, self._images_since, self._last_refresh = 0, now, now
        self._status = ", ".join(parts)
        return self._status

    def _line(self, trainer: L.Trainer, step: int, now: float) -> str:
        # Time left at the pace since the previous line (validation included), so a slow start or a
        # busy spell earlier in the run does not skew it; the whole run's pace for the first line.
        since_step, since = self._paced
        done, elapsed = step - since_step, now - since
        self._paced = (step, now)
        left = elapsed / done * (self._total - step) if done and self._total else float("nan")
        elapsed = now - self._start
        total = f"/{self._total} ({100 * step / self._total:.0f}%)" if self._total else ""
        return f"step {step}{total} | {_clock(elapsed)} elapsed, {_clock(left)} left | {self._refresh(trainer, now)}"

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.is_enabled or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_") and v.numel() == 1}
        if metrics:
            text = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
            self._print(f"step {trainer.global_step}: {text}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.is_enabled:
            elapsed = time.monotonic() - self._start
            self._print(f"glowlab: trained to step {trainer.global_step} in {_clock(elapsed)}")


class RunClock(L.Callback):
    """Logs ``time_s``, the run's training wall-clock seconds, with every training log row.

    The clock starts when training starts and is kept in checkpoints, so a resumed or requeued run
    continues it: ``metrics.csv`` can be plotted against time as well as steps (``glowlab report``).
    Time spent in validation counts, start-up before the first step does not.

    References: Falcon et al., PyTorch Lightning, 2019.
    """

    def __init__(self) -> None:
        self.elapsed = 0.0  # seconds before this process started training (restored from a checkpoint)
        self._start: float | None = None

    def seconds(self) -> float:
        """Training seconds so far, over every restart."""
        return self.elapsed + (time.monotonic() - self._start if self._start is not None else 0.0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()
        # A resumed run says so in its log even without the progress bar (whose first line says it).
        shown = any(isinstance(c, RunProgress) and c.is_enabled for c in trainer.callbacks)
        if trainer.global_step and trainer.is_global_zero and not shown:
            print(f"glowlab: resumed at step {trainer.global_step} ({_clock(self.elapsed)} trained before)", flush=True)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Only on rows that are written: a Python number logged on a GPU becomes a device tensor
        # through a blocking copy, which would add a host synchronisation to every step.
        if trainer._logger_connector.should_update_logs:
            pl_module.log("time_s", self.seconds(), on_step=True, on_epoch=False, rank_zero_only=True)

    def state_dict(self) -> dict[str, float]:
        return {"elapsed": self.seconds()}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.elapsed = float(state_dict["elapsed"])
