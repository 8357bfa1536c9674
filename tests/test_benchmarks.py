"""The benchmark scripts' measuring code: peak-RSS readings and small runs of the memory scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from memory import current_rss_mib, live_memory_env, peak_rss_mib, reset_peak_rss  # noqa: E402


def test_peak_rss_counts_a_new_allocation_and_restarts_on_reset() -> None:
    reset_peak_rss()
    base = current_rss_mib()
    block = torch.ones(64 * 2**20)  # 256 MiB, every page written
    assert peak_rss_mib() - base > 240
    del block
    reset_peak_rss()
    assert peak_rss_mib() - current_rss_mib() < 16


def test_step_peak_of_a_worker_ignores_its_parents_memory() -> None:
    # getrusage's ru_maxrss survives exec: a worker started from this (now large) process would
    # report at least this process's RSS. VmHWM is the worker's own.
    ballast = torch.ones(128 * 2**20)  # 512 MiB held by the parent while the worker runs
    cmd = [sys.executable, str(BENCHMARKS / "throughput_vs_normflows.py"), "--memory-worker", "glowlab"]
    out = subprocess.run(
        [*cmd, "--width", "8", "--batch", "2"], check=True, capture_output=True, text=True, env=live_memory_env()
    )
    step_peak = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0 < step_peak < 100, step_peak
    assert ballast.sum() > 0


def test_memory_depth_prints_rows_and_ratios() -> None:
    cmd = [sys.executable, str(BENCHMARKS / "memory_depth.py"), "--width", "8", "--batch", "2"]
    out = subprocess.run(
        [*cmd, "--depths", "1", "2", "--steps", "1", "--precision", "bf16"], check=True, capture_output=True, text=True
    ).stdout
    rows = [line for line in out.splitlines() if "s/step" in line]
    assert len(rows) == 4 and all("images/s" in row for row in rows)
    assert "invertible  K=2 / K=1: peak" in out and "time invertible / standard at K=2:" in out
    assert "precision bf16" in out
