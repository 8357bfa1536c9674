"""Two CPU processes under Lightning DDP (gloo): disjoint training shards, exactly-once test pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from datasets import prepared_digits
from helpers import glow_module

from glowlab.data import read_manifest
from glowlab.training import ShardDataModule

SHARD = 50


def run_ddp_job(root: Path, out: Path, *options: str) -> list[dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    job = Path(__file__).with_name("ddp_job.py")
    result = subprocess.run(
        [sys.executable, str(job), str(root), str(out), *options], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> Path:
    return prepared_digits(tmp_path_factory.mktemp("digits"), shard_size=SHARD)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, digits_shards) -> tuple[Path, Path, list[dict]]:
    out = tmp_path_factory.mktemp("ddp")
    return digits_shards, out, run_ddp_job(digits_shards, out)


def test_training_ranks_see_disjoint_shards_and_equal_batches(ddp_run) -> None:
    _, _, ranks = ddp_run
    for epoch in range(2):
        a, b = (r["train"][epoch] for r in ranks)
        assert len(a) == len(b) == 640 // 2  # epoch_size split over 2 ranks; batches of 16
    first = [{i // SHARD for i in r["train"][0]} for r in ranks]
    assert first[0] and first[1] and not first[0] & first[1]


def test_training_epoch_mean_and_its_checkpoint_cover_every_processs_batches(ddp_run) -> None:
    _, _, ranks = ddp_run
    last = [r["epoch_sums"][-1] for r in ranks]  # each process's own sums over the last epoch
    assert [part["count"] for part in last] == [320, 320]
    total = sum(part["sums"]["train_bpd"] for part in last)
    assert ranks[0]["train_bpd_epoch"] == ranks[1]["train_bpd_epoch"] == pytest.approx(total / 640, rel=1e-6)
    own = last[0]["sums"]["train_bpd"] / 320
    assert abs(own - total / 640) > 1e-4  # the processes' batches differ: rank 0's mean alone is another figure
    saved = ranks[0]["saved_epoch_means"]
    assert saved["count"] == 640 and saved["epoch"] == 1
    assert saved["sums"]["train_bpd"] == pytest.approx(total, rel=1e-6)


def test_actnorm_initialisation_is_identical_on_every_rank(ddp_run) -> None:
    _, _, ranks = ddp_run
    assert ranks[0]["actnorm_bias"] == ranks[1]["actnorm_bias"]
    assert ranks[0]["parameters"] == ranks[1]["parameters"]


def test_throughput_counts_the_same_flops_on_every_rank(ddp_run) -> None:
    _, _, ranks = ddp_run
    assert ranks[0]["flops_per_image"] == ranks[1]["flops_per_image"] > 0
    logged = [
        "throughput/images_per_sec",
        "throughput/images_per_sec_per_device",
        "throughput/tflops_per_sec_per_device",
    ]
    assert ranks[0]["throughput_logged"] == logged  # no peak known for a CPU: no MFU


def test_captured_steps_train_as_ddp_does(ddp_run, tmp_path) -> None:
    """With cuda_graphs (the emulated capture), DDP's hook-based reduction is off and the module
    averages the gradients itself: the same parameters as the eager DDP run, bit for bit."""
    root, _, eager = ddp_run
    ranks = run_ddp_job(root, tmp_path, "--cuda-graphs")
    assert ranks[0]["captured"] and ranks[1]["captured"]
    assert eager[0]["ddp_reduces"] and not ranks[0]["ddp_reduces"]  # not reduced twice a step
    assert any("training step captured for batches of shape (8, 1, 8, 8)" in m for m in ranks[0]["messages"])
    assert ranks[0]["parameters"] == ranks[1]["parameters"] == eager[0]["parameters"]
    assert ranks[0]["test_bpd"] == eager[0]["test_bpd"]
    assert ranks[0]["flops_per_image"] == eager[0]["flops_per_image"]  # counted on an eager step


def test_compiled_and_captured_model_keeps_replicas_equal(ddp_run, tmp_path) -> None:
    root, _, eager = ddp_run
    ranks = run_ddp_job(root, tmp_path, "--compile", "--cuda-graphs")
    assert ranks[0]["captured"] and ranks[1]["captured"]
    assert ranks[0]["parameters"] == ranks[1]["parameters"]
    assert ranks[0]["test_bpd"] == ranks[1]["test_bpd"]
    # The same run as the eager one up to float rounding (Adamax amplifies it in tiny gradients).
    assert ranks[0]["test_bpd"] == pytest.approx(eager[0]["test_bpd"], abs=1e-2)


def test_weight_average_and_variational_dequantization_stay_equal_across_ranks(ddp_run, tmp_path) -> None:
    root, _, _ = ddp_run
    ranks = run_ddp_job(root, tmp_path, "--ema-variational")
    assert ranks[0]["averaged"] == ranks[1]["averaged"] == 80  # 2 epochs of 640 images, batches of 16
    assert ranks[0]["parameters"] == ranks[1]["parameters"]
    assert ranks[0]["test_bpd"] == ranks[1]["test_bpd"]


def test_a_loss_not_finite_on_one_process_skips_the_step_on_every_process(ddp_run, tmp_path) -> None:
    root, _, eager = ddp_run
    ranks = run_ddp_job(root, tmp_path, "--poison-one-loss")
    assert ranks[0]["skipped_steps"] == ranks[1]["skipped_steps"] == 1 and eager[0]["skipped_steps"] == 0
    assert ranks[0]["parameters"] == ranks[1]["parameters"]  # the replicas did not drift apart


def test_test_pass_covers_each_sample_exactly_once(ddp_run) -> None:
    root, out, ranks = ddp_run
    seen = ranks[0]["test"] + ranks[1]["test"]
    assert sorted(seen) == list(range(read_manifest(str(root))["splits"]["test"]["count"]))
    assert ranks[0]["test_bpd"] == ranks[1]["test_bpd"]
    # One process on the same weights gives the same bits/dim: the dequantization noise is seeded
    # per sample, and the mean is over images, not over per-rank means.
    data = ShardDataModule(root=str(root), eval_batch_size=64)
    model = glow_module(image_shape=data.image_shape, n_bins=data.n_bins, levels=2, steps=2, hidden_channels=16)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    single = trainer.test(model, datamodule=data, verbose=False)[0]["test_bpd"]
    assert single == pytest.approx(ranks[0]["test_bpd"], abs=1e-5)
