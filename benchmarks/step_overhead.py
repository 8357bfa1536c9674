"""Host work of a Lightning training step beyond the model's: what bounds the digits main job on a GPU.

Runs ``glowlab fit --config configs/digits.yaml`` in this process with a model of almost no
arithmetic (``--model.flow.steps 1 --model.flow.hidden_channels 4``: 2 levels of one flow step, a few
hundred tiny operators) and a callback that measures

* the wall time of a training iteration (Lightning's loop, the data loader, glowlab's hooks,
  forward, backward, clipping, the non-finite guard, the optimizer and the learning-rate schedule),
  median over the iterations after a warm-up, leaving out those that run validation;
* the same model's bare step (``losses``, backward, ``optimizer.step()``, nothing else) on the
  iteration's batch, run at the end of every other iteration after the warm-up, median; those
  iterations are left out of the iteration times, so the two medians alternate in time and a
  shared machine's drift moves both alike; the difference is the host time the training loop adds
  to every step;
* Python function calls per iteration and per bare step, counted with ``sys.setprofile`` over
  ``--count`` iterations: a deterministic measure of host work, where the times move with the
  machine's load.

On a GPU the model's own work is a short captured graph (``--model.cuda_graphs true``) or a few
hundred kernel launches, so this host time is what the main job's 2000 steps cost beyond it.

    python benchmarks/step_overhead.py                     # CPU
    python benchmarks/step_overhead.py --accelerator gpu   # the same on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from main_job import CSV_ONLY

ROOT = Path(__file__).resolve().parents[1]
RESULT = "GLOWLAB_STEP_OVERHEAD_JSON"  # where the callback writes its figures (the process's environment)


class PythonCalls:
    """Counts Python function calls while on (``sys.setprofile``); :meth:`pause` and :meth:`resume` it."""

    def __init__(self) -> None:
        self.calls = 0

    def _count(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            self.calls += 1

    def resume(self) -> None:
        sys.setprofile(self._count)

    def pause(self) -> None:
        sys.setprofile(None)

    def __enter__(self) -> PythonCalls:
        self.resume()
        return self

    def __exit__(self, *exc: object) -> None:
        self.pause()


class StepOverhead(L.Callback):
    """Times training iterations and, between them, bare steps; counts the Python calls of both
    (iterations that ran validation left out)."""

    def __init__(self, warmup: int = 20, count: int = 40) -> None:
        self.warmup, self.count = warmup, count
        self.starts: list[tuple[int, float]] = []  # (global step, time) at each batch's start
        self.validated: set[int] = set()  # iterations (by global step) that ran validation
        self.with_bare: set[int] = set()  # iterations (by global step) that ended with a bare step
        self.bare_seconds: list[float] = []
        self.last_inputs: torch.Tensor | None = None
        self.counter = PythonCalls()
        self.counted: list[tuple[int, int]] = []  # (global step, calls so far) at each batch's start in the window

    def _window(self, trainer: L.Trainer) -> range:
        # The last `count` iterations that end at a batch start (the very last one ends in teardown).
        return range(trainer.max_steps - 1 - self.count, trainer.max_steps - 1)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self.starts.append((step, time.perf_counter()))
        window = self._window(trainer)
        if step in window or step == window.stop:
            self.counted.append((step, self.counter.calls))
        if step == window.start:
            self.counter.resume()
        elif step == window.stop:
            self.counter.pause()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step - 1  # the step this iteration began at (no gradient accumulation)
        self.last_inputs = batch[0]
        if self.warmup <= step < self._window(trainer).start and step % 2:
            self.with_bare.add(step)
            self.bare_seconds.append(bare_step(trainer.optimizers[0], pl_module, batch[0]))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validated.add(trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        window = self._window(trainer)
        # An iteration runs from its batch's start to the next's; validation runs at the end of the
        # iteration whose step it is recorded under, once that step's optimizer update is done.
        timed = [
            b - a
            for (s, a), (_, b) in zip(self.starts, self.starts[1:], strict=False)
            if self.warmup <= s < window.start and s + 1 not in self.validated and s not in self.with_bare
        ]
        # Calls per counted iteration, those that ran validation left out as in the times: the
        # checkpoints written after validation's end hooks belong to it, not to a training step.
        calls = [
            b - a for (s, a), (_, b) in zip(self.counted, self.counted[1:], strict=False) if s + 1 not in self.validated
        ]
        with PythonCalls() as counter:
            bare_step(trainer.optimizers[0], pl_module, self.last_inputs)
        result = {
            "iteration_ms": 1000 * statistics.median(timed),
            "iterations_timed": len(timed),
            "bare_step_ms": 1000 * statistics.median(self.bare_seconds),
            "bare_steps_timed": len(self.bare_seconds),
            "calls_per_iteration": statistics.mean(calls),
            "iterations_counted": len(calls),
            "calls_per_bare_step": counter.calls,
            "device": str(pl_module.device),
        }
        Path(os.environ[RESULT]).write_text(json.dumps(result, allow_nan=False))


def bare_step(optimizer: torch.optim.Optimizer, module: L.LightningModule, x: torch.Tensor) -> float:
    """Seconds of the module's own step on the dequantized images ``x``: no Lightning. On a GPU the
    device is idle when it starts and when it ends, so the time is the step's whole."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss, _ = module.losses(x, None)
    loss.backward()
    optimizer.step()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--count", type=int, default=40, help="the last COUNT steps' Python calls are counted")
    args, extra = parser.parse_known_args()
    if args.steps < args.count + 40:
        raise SystemExit(f"--steps {args.steps}: needs at least --count + 40 ({args.count + 40})")
    from glowlab.cli import main as glowlab

    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)
        glowlab(["prepare", "digits", "--out", "digits"])
        os.environ[RESULT] = str(Path(work) / "result.json")
        callback = f'{{"class_path": "step_overhead.StepOverhead", "init_args": {{"count": {args.count}}}}}'
        fit = ["fit", "--config", str(ROOT / "configs" / "digits.yaml"), "--data.root", "digits"]
        fit += ["--trainer.accelerator", args.accelerator, "--trainer.max_steps", str(args.steps)]
        fit += ["--model.flow.steps", "1", "--model.flow.hidden_channels", "4", "--test_after_fit", "false"]
        fit += ["--trainer.enable_progress_bar", "false", "--trainer.logger", CSV_ONLY]
        try:
            glowlab([*fit, "--trainer.callbacks+", callback, *extra])
        except SystemExit as stop:
            if stop.code:
                raise
        result = json.loads(Path(os.environ[RESULT]).read_text())
    overhead = result["iteration_ms"] - result["bare_step_ms"]
    print(
        f"training iteration {result['iteration_ms']:7.2f} ms, bare step {result['bare_step_ms']:7.2f} ms: "
        f"the loop adds {overhead:.2f} ms a step ({result['device']}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
    )
    # Means over the counted steps, rounded before the difference so that the three figures add up.
    iteration_calls, bare_calls = round(result["calls_per_iteration"]), round(result["calls_per_bare_step"])
    print(
        f"Python calls: {iteration_calls} an iteration, {bare_calls} in the bare step: "
        f"the loop adds {iteration_calls - bare_calls}"
    )


if __name__ == "__main__":
    main()
