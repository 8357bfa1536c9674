"""slurm/train.sbatch on a real single-node SLURM cluster: 2 CPU tasks, USR1 mid-run, requeue, resume."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import prepared_digits

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 150
DISTRIBUTED = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK"}
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def sh(*args: str, **kwargs) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs).stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict[str, str]:
    state = tmp_path_factory.mktemp("slurm")
    # The jobs inherit this environment (sbatch exports it): leave out what in-process tests of
    # distributed training may have set in it.
    inherited = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED and not k.startswith("SLURM_")}
    env = {**inherited, "GLOWLAB_SLURM_DIR": str(state), "SLURM_CONF": str(state / "slurm.conf")}
    script = str(ROOT / "slurm" / "local-cluster.sh")
    if shutil.which("slurmctld") is None:
        # A fresh Debian machine: install the packages (root and apt needed; that is what CI has).
        installed = subprocess.run([script, "install"], env=env, timeout=900, capture_output=True, text=True)
        assert installed.returncode == 0, f"could not install SLURM with {script} install:\n{installed.stderr[-2000:]}"
    subprocess.run([script, "start"], check=True, env=env, timeout=120)
    yield env
    subprocess.run([script, "stop"], env=env, timeout=60)


def job_field(env: dict[str, str], job: str, field: str) -> str:
    info = sh("scontrol", "show", "job", job, env=env)
    match = re.search(rf"\b{field}=(\S+)", info)
    return match.group(1) if match else ""


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else f"({path} does not exist)"


def diagnosis(env: dict[str, str], job: str, log: Path) -> str:
    """What a failed wait needs to be understood from CI output alone: the job, its log, the daemons' logs."""
    try:
        info = sh("scontrol", "show", "job", job, env=env)
    except subprocess.CalledProcessError as error:
        info = f"scontrol show job {job} failed: {error.stderr}"
    daemons = Path(env["GLOWLAB_SLURM_DIR"]) / "log"
    daemon_logs = "".join(f"\n--- {name}\n{tail(daemons / name, 1500)}" for name in ("slurmctld.log", "slurmd.log"))
    return f"\n--- scontrol show job {job}\n{info}\n--- {log}\n{tail(log)}{daemon_logs}"


def wait(condition, timeout: float, what: str, explain=lambda: "", gave_up=lambda: False) -> None:
    """Poll `condition` every second; stop early once `gave_up()` says it never will be met."""
    deadline = time.time() + timeout
    while not condition():
        if gave_up():
            raise AssertionError(f"gave up waiting for {what}{explain()}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}{explain()}")
        time.sleep(1)


def logged_steps(metrics: Path) -> int:
    if not metrics.is_file():
        return -1
    with open(metrics) as f:
        return max((int(r["step"]) for r in csv.DictReader(f) if r.get("step")), default=-1)


@pytest.fixture(scope="module")
def trained(cluster, tmp_path_factory) -> dict:
    """A 2-task training job that gets SIGUSR1 mid-run, requeues and finishes."""
    tmp_path = tmp_path_factory.mktemp("train")
    data = prepared_digits(tmp_path / "digits", shard_size=200)
    out = tmp_path / "runs"
    site = tmp_path / "cluster.env"
    site.write_text(f"GLOWLAB_ACCELERATOR=cpu\nGLOWLAB_OUTPUT_ROOT={out}\nGLOWLAB_PYTHON={sys.executable}\n")
    env = {**cluster, "GLOWLAB_CLUSTER_ENV": str(site), "WANDB_MODE": "offline"}
    overrides = [f"--data.root={data}", f"--trainer.max_steps={MAX_STEPS}", "--model.flow.steps=2"]
    overrides += [
        "--model.flow.hidden_channels=16",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.enable_progress_bar=false",
    ]
    submitted = sh("sbatch", "--parsable", "--ntasks-per-node=2", f"--output={tmp_path}/job-%j.out",
                   str(ROOT / "slurm" / "train.sbatch"), str(ROOT / "configs" / "digits.yaml"), *overrides,
                   env=env, cwd=ROOT)  # fmt: skip
    job = submitted.strip().split(";")[0]
    run_dir = out / f"digits-{job}"
    metrics = run_dir / "logs" / "run" / "metrics.csv"
    log = tmp_path / f"job-{job}.out"

    explain = lambda: diagnosis(env, job, log)  # noqa: E731
    ended = lambda: job_field(env, job, "JobState") in ENDED  # noqa: E731

    # Signal once training is well under way (a pending job would block `scancel --signal`).
    wait(lambda: job_field(env, job, "JobState") == "RUNNING", 300, f"job {job} to start", explain, ended)
    wait(lambda: logged_steps(metrics) >= 20, 300, f"job {job} to train 20 steps", explain, ended)
    sh("scancel", "--signal=USR1", job, env=env)
    wait(lambda: job_field(env, job, "Restarts") == "1", 120, f"job {job} to requeue", explain)
    # A requeued job waits about two minutes before it may start again; let it start now.
    wait(lambda: job_field(env, job, "JobState") == "PENDING", 60, "the requeued job to be pending", explain)
    sh("scontrol", "update", f"JobId={job}", "StartTime=now", env=env)
    wait(ended, 300, f"job {job} to finish", explain)

    return {"env": env, "job": job, "run_dir": run_dir, "log": log, "data": data, "out": out}


def test_train_sbatch_requeues_on_usr1_and_resumes_without_losing_steps(trained) -> None:
    env, job, run_dir, log = trained["env"], trained["job"], trained["run_dir"], trained["log"]
    text = log.read_text()
    assert job_field(env, job, "JobState") == "COMPLETED", text[-3000:]
    preempted = run_dir / "logs" / "run" / "checkpoints" / "preempted.ckpt"
    assert preempted.is_file() and not list(run_dir.glob("hpc_ckpt_*.ckpt")), text[-3000:]
    interrupted_at = torch.load(preempted, weights_only=False)["global_step"]
    assert 0 < interrupted_at < MAX_STEPS
    assert "resuming from" in text and f"glowlab: resumed at step {interrupted_at}" in text
    last = torch.load(run_dir / "logs" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == MAX_STEPS
    # The metrics of both starts are in one file: steps before and after the interruption.
    with open(run_dir / "logs" / "run" / "metrics.csv") as f:
        steps = {int(r["step"]) for r in csv.DictReader(f) if r.get("train_loss")}
    assert min(steps) < interrupted_at < max(steps) and max(steps) >= MAX_STEPS - 10
    assert (run_dir / "logs" / "run" / "config.yaml").is_file() and (run_dir / "slurm.yaml").is_file()
    # Both starts wrote to one W&B run (offline), named by the run and job id.
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert runs and all(r.name.endswith(f"digits-{job}") for r in runs)


def test_eval_and_sweep_jobs_on_the_trained_checkpoint(trained, tmp_path) -> None:
    env, data, out = trained["env"], trained["data"], trained["out"]
    ckpt = trained["run_dir"] / "logs" / "run" / "checkpoints" / "last.ckpt"
    evaluation = sh("sbatch", "--parsable", "--ntasks-per-node=2", f"--output={tmp_path}/eval-%j.out",
                    str(ROOT / "slurm" / "eval.sbatch"), str(ckpt), str(data), "--draws", "2",
                    env=env, cwd=ROOT).strip()  # fmt: skip
    sweep_env = {**env, "GLOWLAB_CKPTS": str(ckpt), "GLOWLAB_TEMPERATURES": "0.5 1.0"}
    sweep = sh("sbatch", "--parsable", "--array=0-1", f"--output={tmp_path}/sweep-%A_%a.out",
               str(ROOT / "slurm" / "sweep.sbatch"), "sample", "--num-samples", "4",
               env=sweep_env, cwd=ROOT).strip()  # fmt: skip
    for job in (evaluation, f"{sweep}_0", f"{sweep}_1"):
        log = next(tmp_path.glob(f"*{job.split('_')[0]}*.out"), tmp_path / f"{job}.out")
        wait(lambda job=job: job_field(env, job, "JobState") in ENDED, 300, f"job {job}",
             lambda job=job, log=log: diagnosis(env, job, log))  # fmt: skip
        assert job_field(env, job, "JobState") == "COMPLETED", "".join(
            p.read_text()[-2000:] for p in tmp_path.glob("*.out")
        )
    result = json.loads((out / f"eval-{evaluation}" / "bpd.json").read_text())
    assert result["num_images"] == 359 and result["draws"] == 2  # 2 DDP tasks, each image once
    assert sorted(p.name for p in (out / f"sweep-{sweep}").glob("*.png")) == ["last-T0.5.png", "last-T1.0.png"]
