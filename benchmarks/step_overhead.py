"""Host work of a Lightning training step beyond the model's: what bounds the digits main job on a GPU.

Runs ``glowlab fit --config configs/digits.yaml`` in this process with a model of almost no
arithmetic (``--model.flow.steps 1 --model.flow.hidden_channels 4``: 2 levels of one flow step, a few
hundred tiny operators) and a callback that measures

* the wall time of a training iteration (Lightning's loop, the data loader, glowlab's hooks,
  forward, backward, clipping, the non-finite guard, the optimizer and the learning-rate schedule),
  median over the iterations after a warm-up, leaving out those that run validation;
* the same model's bare step (``losses``, backward, ``optimizer.step()``, nothing else) on one
  batch, median over 60 steps, once training ends; the difference is the host time the training
  loop adds to every step;
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

from glowlab.likelihood import dequantize

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
    """Times training iterations and counts their Python calls (validation left out of both); at
    the end of training, measures the bare step."""

    def __init__(self, warmup: int = 20, count: int = 40) -> None:
        self.warmup, self.count = warmup, count
        self.starts: list[tuple[int, float]] = []  # (global step, time) at each batch's start
        self.validated: set[int] = set()  # iterations (by global step) that ran validation
        self.counter = PythonCalls()
        self.counting = False

    def _window(self, trainer: L.Trainer) -> range:
        # The last `count` iterations that end at a batch start (the very last one ends in teardown).
        return range(trainer.max_steps - 1 - self.count, trainer.max_steps - 1)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self.starts.append((step, time.perf_counter()))
        window = self._window(trainer)
        if step == window.start:
            self.counting = True
            self.counter.resume()
        elif step == window.stop:
            self.counter.pause()
            self.counting = False

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validated.add(trainer.global_step)
        if self.counting:
            self.counter.pause()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.counting:
            self.counter.resume()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        window = self._window(trainer)
        # An iteration runs from its batch's start to the next's; validation runs at the end of the
        # iteration whose step it is recorded under, once that step's optimizer update is done.
        timed = [
            b - a
            for (s, a), (_, b) in zip(self.starts, self.starts[1:], strict=False)
            if self.warmup <= s < window.start and s + 1 not in self.validated
        ]
        bare_ms, bare_calls = bare_step(trainer, pl_module)
        result = {
            "iteration_ms": 1000 * statistics.median(timed),
            "iterations_timed": len(timed),
            "bare_step_ms": bare_ms,
            "calls_per_iteration": self.counter.calls / len(window),
            "calls_per_bare_step": bare_calls,
            "device": str(pl_module.device),
        }
        Path(os.environ[RESULT]).write_text(json.dumps(result, allow_nan=False))


def bare_step(trainer: L.Trainer, module: L.LightningModule) -> tuple[float, float]:
    """(median ms, Python calls) of the module's own step on one training batch: no Lightning."""
    optimizer = trainer.optimizers[0]
    datamodule = trainer.datamodule
    batch = next(iter(datamodule.train_dataloader()))
    levels = batch[0].to(module.device)
    x = dequantize(levels, datamodule.n_bins, generator=torch.Generator(device=module.device).manual_seed(0))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = module.losses(x, None)
        loss.backward()
        optimizer.step()

    times = []
    for _ in range(60):
        start = time.perf_counter()
        step()
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    with PythonCalls() as counter:
        step()
    return 1000 * statistics.median(times[10:]), counter.calls


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
    print(
        f"Python calls: {result['calls_per_iteration']:.0f} an iteration, {result['calls_per_bare_step']:.0f} "
        f"in the bare step: the loop adds {result['calls_per_iteration'] - result['calls_per_bare_step']:.0f}"
    )


if __name__ == "__main__":
    main()
