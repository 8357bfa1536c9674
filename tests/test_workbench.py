"""Run hygiene and the researcher's workbench: console output, threads, the run's W&B record, report pieces."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import prepared_digits

from glowlab.jobs.report import nearest_distances, read_curves, reconstruction_errors
from glowlab.models import Glow
from glowlab.threads import apply_threads, resolve_threads

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("litlogger", "LeafSpec", "GPU available", "Tip:", "anonymous", "Traceback")


def glowlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "glowlab", *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> dict:
    """A 20-step fit of the main job's config in a subprocess with its output captured (not a terminal)."""
    root = tmp_path_factory.mktemp("hygiene")
    data = prepared_digits(root / "digits", shard_size=400)
    args = ["--config", str(ROOT / "configs" / "digits.yaml"), "--data.root", str(data)]
    fit = glowlab("fit", *args, "--trainer.max_steps", "20", "--trainer.log_every_n_steps", "2", cwd=root)
    assert fit.returncode == 0, fit.stderr[-3000:]
    return {"root": root, "data": data, "args": args, "fit": fit, "run": root / "runs" / "digits" / "version_0"}


def test_a_logged_run_prints_plain_progress_lines_and_no_library_noise(logged_run) -> None:
    out = logged_run["fit"].stdout + logged_run["fit"].stderr
    assert "\r" not in out  # not a terminal: no carriage-return updates
    assert "glowlab: MultiscaleFlow with" in out and "20 steps" in out and "CPU thread(s)" in out
    assert "glowlab: a training step is 0.007945 GFLOP an image (forward and backward" in out
    # One line at every tenth of the run, each with the step out of max_steps, time left and the loss.
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines][-1] == "20/20" and len(lines) >= 5
    assert all("left" in line and "train_bpd" in line for line in lines)
    assert not [word for word in NOISE if word in out], out[-3000:]
    record = json.loads((logged_run["run"] / "wandb.json").read_text())
    assert record["mode"] == "offline" and f"wandb sync {record['folder']}" in out


def test_metrics_have_a_wall_clock_column(logged_run) -> None:
    with open(logged_run["run"] / "metrics.csv") as f:
        times = [float(r["time_s"]) for r in csv.DictReader(f) if r.get("time_s")]
    assert len(times) >= 5 and times == sorted(times) and times[0] > 0


def test_the_wandb_config_holds_the_whole_run_config(logged_run) -> None:
    record = json.loads((logged_run["run"] / "wandb.json").read_text())
    # Offline, W&B keeps the run's config in its binary log (the config keys and values as text).
    log = next(Path(record["folder"]).glob("run-*.wandb")).read_bytes()
    # Not only the model's options: the data, the trainer and the seed too.
    assert all(
        key.encode() in log for key in ("eval_batch_size", "max_steps", "seed_everything", str(logged_run["data"]))
    )


def test_testing_a_run_checkpoint_logs_into_that_run(logged_run) -> None:
    run, root = logged_run["run"], logged_run["root"]
    ckpt = run / "checkpoints" / "last.ckpt"
    tested = glowlab("test", *logged_run["args"], "--ckpt_path", str(ckpt), cwd=root)
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert (run / "test-last" / "test_results.json").is_file()
    assert not (root / "runs" / "digits" / "version_1").exists()
    record = json.loads((run / "wandb.json").read_text())
    # Fit and test: two offline folders of one W&B run id, side by side (`wandb sync` takes both).
    assert len(list(Path(record["folder"]).parent.glob(f"offline-run-*-{record['id']}"))) == 2
    # The report logs its figures into that run as well.
    report = glowlab("report", str(run), "--num-samples", "20", cwd=root)
    assert report.returncode == 0, report.stderr[-3000:]
    assert json.loads((run / "report" / "report.json").read_text())["figures"]["curves"].endswith("curves.png")
    assert len(list(Path(record["folder"]).parent.glob(f"offline-run-*-{record['id']}"))) == 3


def test_threads_auto_and_explicit(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert resolve_threads("auto", small_model=True) == 1
        cores = len(os.sched_getaffinity(0))
        assert resolve_threads("auto") == cores and resolve_threads("auto", processes=cores * 2) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert resolve_threads("auto", small_model=True) == 3  # the site's or user's setting wins
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        for bad in ("0", "two", -1, 1.5):
            with pytest.raises(ValueError, match="threads"):
                resolve_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_fit_and_jobs_refuse_a_bad_thread_count(tmp_path) -> None:
    from glowlab.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["sample", "--ckpt", "x.ckpt", "--threads", "none"])
    assert stopped.value.code == 2


def test_read_curves_interpolates_validation_times(tmp_path) -> None:
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(
        "step,time_s,train_bpd_step,val_bpd\n10,1.0,4.0,\n20,3.0,3.5,\n20,,,3.6\n30,5.0,nan,\n30,,,3.4\n"
    )
    curves = read_curves(metrics)
    assert curves["train"]["name"] == "train_bpd_step" and curves["train"]["steps"].tolist() == [10, 20]
    assert curves["val"]["steps"].tolist() == [20, 30] and curves["val"]["seconds"].tolist() == [3.0, 5.0]
    with pytest.raises(ValueError, match=r"metrics\.csv"):
        read_curves(tmp_path / "missing.csv")


def test_nearest_distances_find_copies() -> None:
    torch.manual_seed(0)
    train = torch.rand(50, 64)
    copies = train[[3, 7, 7]]
    distances, indices = nearest_distances(copies, train, chunk=2)
    # Exactly 0: the matrix-product form alone leaves a copy up to about 1e-3 away, by the GEMM's rounding.
    assert distances.tolist() == [0.0, 0.0, 0.0] and indices.tolist() == [3, 7, 7]
    far = nearest_distances(train[:5] + 10.0, train)[0]
    assert bool((far > 10.0).all())


def test_reconstruction_errors_are_tiny_at_every_level() -> None:
    torch.manual_seed(0)
    model = Glow(image_shape=(1, 8, 8), n_bins=17, levels=3, steps=2, hidden_channels=8).eval()
    x = torch.rand(6, 1, 8, 8) - 0.5
    with torch.no_grad():
        model.train().evaluate(x)  # ActNorm's data-dependent initialisation
    model.eval()
    rows = reconstruction_errors(model, x)
    assert [r["stage"] for r in rows] == ["level 1", "level 2", "level 3", "whole model"]
    assert all(r["max_abs"] < 1e-4 and r["changed"] == 0.0 for r in rows)
    # A broken inverse shows up in the row of its level.
    level = model.levels[1]
    original = level.inverse
    level.inverse = lambda y, context=None: original(y, context) + 0.1  # type: ignore[method-assign]
    broken = reconstruction_errors(model, x)
    assert broken[0]["max_abs"] < 1e-4 and broken[1]["max_abs"] > 0.01 and np.isfinite(broken[1]["rms"])


def test_report_of_a_conditional_run_measures_the_class_of_its_samples(logged_run, tmp_path) -> None:
    root, data = logged_run["root"], logged_run["data"]
    classifier = tmp_path / "classifier.pt"
    trained = glowlab("evaluate", "train-classifier", "--data", str(data), "--epochs", "1", "--out", str(classifier),
                      cwd=root)  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    config = ROOT / "configs" / "digits-conditional.yaml"
    csv_only = f'[{{"class_path": "glowlab.training.ResumableCSVLogger", "init_args": {{"save_dir": "{tmp_path}"}}}}]'
    options = ["--data.root", str(data), "--trainer.max_steps", "30", "--trainer.logger", csv_only]
    fit = glowlab("fit", "--config", str(config), *options, cwd=root)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = next(tmp_path.rglob("checkpoints")).parent
    out = tmp_path / "report"
    report = glowlab("report", str(run), "--classifier", str(classifier), "--num-samples", "40", "--out", str(out),
                     cwd=root)  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    result = json.loads((out / "report.json").read_text())
    accuracy = result["class_accuracy"]
    assert accuracy["samples"] == 40 - result["neighbours"]["non_finite_samples"]
    assert 0.0 <= accuracy["accuracy"] <= 1.0 and set(accuracy["per_class"]) <= {str(k) for k in range(10)}
    for name in ("curves", "samples", "reconstruction", "neighbours", "neighbour_pairs", "extremes"):
        assert Path(result["figures"][name]).is_file(), name
    assert all(row["changed"] == 0.0 for row in result["reconstruction"])


def test_threads_before_or_after_a_sub_command(monkeypatch) -> None:
    from glowlab.jobs.args import job_parser

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # auto then means 1: nothing changes for the other tests
    parser = job_parser("glowlab evaluate", None)
    jobs = parser.add_subparsers(dest="job")
    jobs.add_parser("bpd")
    assert parser.parse_args(["--threads", "1", "bpd"]).threads == "1"  # not overwritten by the sub-command
    assert parser.parse_args(["bpd", "--threads", "1"]).threads == "1"
    assert parser.parse_args(["bpd"]).threads == "auto"
