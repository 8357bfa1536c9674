"""Hostile and careless inputs: every one stops with an error naming the culprit, or is handled safely.

Each test is one case of docs/robustness.md: non-finite runs and results, data that changed or
lies, prepare runs that would mix or lose data, checkpoints and signals, and messages that must
name the file or option at fault.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from datasets import prepared, synthetic_npz
from helpers import SignalAfterStep, glow_module, working_directory
from torch.utils.data import DataLoader, TensorDataset

import glowlab
from glowlab.cli import main
from glowlab.data import PrepareOptions, load_source, prepare
from glowlab.data.shards import read_manifest
from glowlab.files import write_atomic, write_json
from glowlab.training import AtomicCheckpointIO, Preemption, ResumableCSVLogger
from glowlab.training.module import NonFiniteTraining

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits.yaml"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SMALL = ["--model.flow.steps", "2", "--model.flow.hidden_channels", "16", *QUIET]


def fails(capsys, argv: list[str], *expected: str) -> str:
    """Run the glowlab command; it must stop with exit status 2 and one message naming ``expected``."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    return err


def all_finite(checkpoint: Path) -> bool:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


# --- non-finite runs and results ------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamax", "adam"])
def test_a_diverging_run_skips_its_steps_then_stops_and_writes_nothing_broken(
    optimizer: str, run, tmp_path, capsys
) -> None:
    args = ["fit", "--config", str(CONFIG), "--data.root", str(run["data"]), "--trainer.max_steps", "200"]
    args += ["--model.lr", "1e6", "--model.warmup_steps", "0", "--model.optimizer", optimizer, *SMALL]
    args += ["--model.max_nonfinite_steps", "5", "--trainer.log_every_n_steps", "5"]
    with working_directory(tmp_path):
        err = fails(capsys, args, "steps in a row had a non-finite loss or gradient", "model.lr=1e+06")
    version = tmp_path / "runs" / "digits" / "version_0"
    for checkpoint in version.rglob("*.ckpt"):
        assert all_finite(checkpoint), checkpoint
    assert not (version / "test_results.json").exists(), err


def test_skipped_steps_leave_parameters_and_optimizer_state_alone() -> None:
    for optimizer in ("adam", "adamax"):
        torch.manual_seed(0)
        module = glow_module(
            image_shape=(1, 8, 8), n_bins=17, levels=2, steps=1, hidden_channels=4, optimizer=optimizer
        )
        images = torch.rand(64, 1, 8, 8) - 0.5
        images[32:] = float("nan")  # every batch after the second is poisoned
        data = DataLoader(TensorDataset(images), batch_size=16)
        trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(module, data)  # steps 3 and 4 are skipped
        optim = trainer.optimizers[0]
        assert all(bool(torch.isfinite(p).all()) for p in module.parameters()), optimizer
        steps = {int(s["step"]) for s in optim.state.values()}
        assert steps == {2}, (optimizer, steps)  # no optimizer state moved for the skipped steps
        assert int(module.nonfinite.total) == 2


def test_no_checkpoint_with_a_non_finite_value_is_written(tmp_path) -> None:
    module = glow_module(image_shape=(1, 8, 8), n_bins=17, levels=2, steps=1, hidden_channels=4)
    with torch.no_grad():
        module.model.top_prior.params[0, 0, 0, 0] = float("inf")
    trainer = L.Trainer(max_steps=0, logger=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.fit(module, DataLoader(TensorDataset(torch.zeros(4, 1, 8, 8)), batch_size=4))
    with pytest.raises(NonFiniteTraining, match=r"parameter model\.top_prior\.params has non-finite values"):
        trainer.save_checkpoint(tmp_path / "broken.ckpt")
    assert not (tmp_path / "broken.ckpt").exists()


def test_a_broken_model_is_refused_by_load_and_every_job(run, tmp_path, capsys) -> None:
    checkpoint = torch.load(run["ckpt"], map_location="cpu", weights_only=False)
    key = next(k for k in checkpoint["state_dict"] if k.endswith("top_prior.params"))
    checkpoint["state_dict"][key][0, 0, 0, 0] = float("nan")
    broken = tmp_path / "broken.ckpt"
    torch.save(checkpoint, broken)
    with pytest.raises(ValueError, match=r"broken.ckpt: parameter top_prior.params has non-finite values"):
        glowlab.load(broken)
    data = str(run["data"])
    for job in (["evaluate", "bpd", "--data", data], ["sample"], ["score", "--data", data]):
        fails(capsys, [*job, "--ckpt", str(broken), "--out", str(tmp_path / "out")], "has non-finite values")
    with working_directory(tmp_path):  # through Lightning: the test pass stops rather than averaging around it
        fails(
            capsys,
            ["test", "--config", str(CONFIG), "--data.root", data, "--ckpt_path", str(broken), *SMALL[:4], *QUIET],
            "bits/dim is not finite",
        )


def test_non_finite_temperatures_and_strengths_are_refused(run, tmp_path, capsys) -> None:
    ckpt, data = str(run["ckpt"]), str(run["data"])
    for value in ("nan", "inf", "-1"):
        with pytest.raises(SystemExit):
            main(["sample", "--ckpt", ckpt, "--temperature", value, "--out", str(tmp_path / "s.png")])
        assert "--temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["manipulate", "--ckpt", ckpt, "--data", data, "--attribute", "class=0", "--strengths", "nan"])
    assert "--strengths" in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()


def test_result_files_are_strict_json_and_never_half_written(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"results.bpd is not a finite number"):
        write_json(tmp_path / "r.json", {"results": {"bpd": float("nan")}})
    assert not (tmp_path / "r.json").exists()
    (tmp_path / "grid.png").write_bytes(b"the previous grid")

    def full_disk(f) -> None:
        f.write(b"half a pn")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(tmp_path / "grid.png", full_disk)
    assert (tmp_path / "grid.png").read_bytes() == b"the previous grid"  # untouched, and no partial left
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


# --- data integrity -------------------------------------------------------------------------------


def test_verify_checks_every_shard_and_names_the_changed_one(tmp_path, capsys) -> None:
    root = prepared(tmp_path, n=40, shard_size=8)
    assert main(["verify", str(root)]) is None
    assert "shards, 40 images" in capsys.readouterr().out
    shard = root / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 1  # a flipped bit the tar reader would never notice
    shard.write_bytes(bytes(data))
    fails(capsys, ["verify", str(root)], "1 of", "train-000001.tar: its sha256 is")


def test_pixel_values_outside_the_grey_levels_are_refused(run, tmp_path) -> None:
    from glowlab.data.shards import DataError, decode

    sample = {"__key__": "00000003", "__url__": "x/train-000000.tar", "npy": b""}
    import io

    buf = io.BytesIO()
    np.save(buf, np.full((8, 8, 1), 20, np.uint8))
    sample["npy"] = buf.getvalue()
    with pytest.raises(DataError, match=r"train-000000.tar key 00000003: pixel value 20 is outside 0..16"):
        decode(sample, "npy", (1, 8, 8), None, 17)


# --- prepare: never mix, never lose ---------------------------------------------------------------


def test_a_second_prepare_into_the_same_folder_stops(tmp_path) -> None:
    import fcntl

    source = load_source("npz", str(synthetic_npz(tmp_path / "s.npz", 20, (3, 4, 4))))
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".prepare.lock", "a") as held:  # what the first run holds while it writes
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(FileExistsError, match=r"out: another glowlab prepare is writing into it"):
            prepare(source, out, PrepareOptions(shard_size=4), progress=False)
    assert not (out / "manifest.json").exists()


def test_a_changed_source_is_not_mixed_into_a_resumed_prepare(tmp_path) -> None:
    npz = synthetic_npz(tmp_path / "s.npz", 20, (3, 4, 4))
    out = tmp_path / "out"
    prepare(load_source("npz", str(npz)), out, PrepareOptions(shard_size=4), progress=False)
    (out / "manifest.json").unlink()  # as if interrupted before the end
    synthetic_npz(npz, 20, (3, 4, 4), seed=1)  # other pixels, same name and count
    with pytest.raises(FileExistsError, match=r"s.npz changed since .* was prepared from it"):
        prepare(load_source("npz", str(npz)), out, PrepareOptions(shard_size=4), progress=False)


def test_overwrite_deletes_only_what_prepare_wrote(tmp_path) -> None:
    npz = synthetic_npz(tmp_path / "s.npz", 20, (3, 4, 4))
    out = tmp_path / "out"
    prepare(load_source("npz", str(npz)), out, PrepareOptions(shard_size=4), progress=False)
    (out / "mine.tar").write_bytes(b"a user's own archive")
    (out / "notes.txt").write_text("keep")
    prepare(load_source("npz", str(npz)), out, PrepareOptions(shard_size=5), overwrite=True, progress=False)
    assert (out / "mine.tar").read_bytes() == b"a user's own archive" and (out / "notes.txt").exists()


def test_prepare_again_rebuilds_exactly_the_missing_or_changed_shards(tmp_path, capsys) -> None:
    npz = synthetic_npz(tmp_path / "s.npz", 40, (3, 4, 4))
    out = tmp_path / "out"
    reference = prepare(load_source("npz", str(npz)), out, PrepareOptions(shard_size=4), progress=False)
    kept = out / "train-000002.tar"
    before = kept.stat().st_mtime_ns
    (out / "train-000000.tar").unlink()
    damaged = out / "val-000000.tar"
    data = bytearray(damaged.read_bytes())
    data[1000] ^= 0xFF  # inside the first image's bytes: same size, other content
    damaged.write_bytes(bytes(data))
    repaired = prepare(load_source("npz", str(npz)), out, PrepareOptions(shard_size=4), progress=True)
    assert "val-000000.tar: differs from the manifest; rebuilding it" in capsys.readouterr().out
    assert repaired["splits"] == reference["splits"]  # the same bytes again: the same checksums
    assert kept.stat().st_mtime_ns == before  # the good shards were not rewritten
    assert main(["verify", str(out)]) is None


def test_prepare_refuses_options_that_only_fail_later(tmp_path, capsys) -> None:
    fails(capsys, ["prepare", "digits", "--out", str(tmp_path / "d"), "--n-bits", "5"], "--n-bits 5", "17 grey levels")
    with pytest.raises(SystemExit):
        main(["prepare", "digits", "--out", str(tmp_path / "d"), "--val-fraction", "0"])
    assert "--val-fraction 0 leaves no validation images" in capsys.readouterr().err
    assert not (tmp_path / "d" / "prepare.json").exists()  # nothing was started


# --- checkpoints and signals ----------------------------------------------------------------------


def test_checkpoints_are_written_beside_their_target(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    replaced = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((Path(a), Path(b))), real(a, b))[1])
    target = tmp_path / "run" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)
    assert replaced == [(target.with_name("last.ckpt.partial"), target)]
    assert torch.load(target, weights_only=True)["state_dict"]["w"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_outside_slurm_checkpoints_into_the_run_folder_and_stops(signum, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    module = glow_module(image_shape=(1, 8, 8), n_bins=17, levels=2, steps=1, hidden_channels=4)
    preemption = Preemption()
    logger = ResumableCSVLogger(save_dir=str(tmp_path / "runs"), name="sig")
    trainer = L.Trainer(
        max_steps=50,
        logger=logger,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[preemption, SignalAfterStep(at=3, signum=signum)],
    )
    trainer.fit(module, DataLoader(TensorDataset(torch.rand(64, 1, 8, 8) - 0.5), batch_size=8))
    saved = Path(logger.log_dir) / "checkpoints" / "preempted.ckpt"
    assert saved.is_file() and preemption.stopped and trainer.global_step < 10
    assert torch.load(saved, weights_only=False)["global_step"] == trainer.global_step
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))  # nothing in the working directory


def test_a_foreign_hpc_checkpoint_is_not_resumed_under_slurm(run, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "glowlab-train")
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"written by another run")
    args = ["fit", "--config", str(CONFIG), "--data.root", str(run["data"]), "--trainer.max_steps", "1", *SMALL]
    with working_directory(tmp_path):
        fails(capsys, [*args, "--trainer.default_root_dir", str(tmp_path)], "hpc_ckpt_1.ckpt: under SLURM")


# --- messages that name the culprit ---------------------------------------------------------------


def test_bad_training_options_are_named(run, tmp_path, capsys) -> None:
    base = ["fit", "--config", str(CONFIG), "--data.root", str(run["data"]), "--trainer.max_steps", "1", *SMALL]
    with working_directory(tmp_path):
        fails(capsys, [*base, "--model.lr", "-0.001"], "model.lr=-0.001 must be a positive number")
        fails(capsys, [*base, "--data.max_shift", "9"], "data.max_shift=9 must be in 0..7")
        fails(capsys, [*base, "--data.shuffle_buffer", "0"], "data.shuffle_buffer=0 must be >= 1")


def test_fit_into_a_read_only_folder_is_one_line(run, tmp_path, capsys) -> None:
    if os.geteuid() == 0:  # root writes anywhere: make the folder a file instead
        (tmp_path / "runs").write_text("not a folder")
    else:
        (tmp_path / "runs").mkdir(mode=0o500)
    args = ["fit", "--config", str(CONFIG), "--data.root", str(run["data"]), "--trainer.max_steps", "1", *SMALL]
    with working_directory(tmp_path):
        err = fails(capsys, args, "runs")
    assert len(err.strip().splitlines()) <= 2, err


def test_checkpoints_that_are_not_checkpoints_are_named(run, tmp_path, capsys) -> None:
    (tmp_path / "empty.ckpt").write_bytes(b"")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(run["ckpt"].read_bytes()[:5000])
    base = ["test", "--config", str(CONFIG), "--data.root", str(run["data"]), *SMALL[:4], *QUIET]
    with working_directory(tmp_path):
        for name in ("empty.ckpt", "other.ckpt", "cut.ckpt"):
            fails(capsys, [*base, "--ckpt_path", str(tmp_path / name)], f"{name}: not a glowlab checkpoint")


def test_a_checkpoints_model_options_win_with_a_note_and_other_data_is_refused(run, tmp_path, capsys) -> None:
    # The weights fit only the model they were trained as: its options replace the given ones, named.
    args = ["test", "--config", str(CONFIG), "--data.root", str(run["data"]), *QUIET, "--ckpt_path", str(run["ckpt"])]
    with working_directory(tmp_path):
        main([*args, "--model.flow.hidden_channels", "32"])  # the run trained 4 steps of width 64
    captured = capsys.readouterr()
    note = "using the checkpoint's model.flow.steps=4 (given 8), model.flow.hidden_channels=64 (given 32)"
    assert note in captured.err
    # A checkpoint of a run folder: the test writes into that run (RUN/test-best/).
    tested = json.loads((run["log"] / "test-best" / "test_results.json").read_text())["test_bpd"]
    fitted = json.loads((run["log"] / "test_results.json").read_text())["test_bpd"]
    assert tested == pytest.approx(fitted, abs=1e-6)
    other = prepared(tmp_path / "rgb", n=10, shape=(3, 8, 8), shard_size=4)
    args = ["test", "--config", str(CONFIG), "--data.root", str(other), *QUIET, "--ckpt_path", str(run["ckpt"])]
    with working_directory(tmp_path):
        fails(capsys, args, "models 1x8x8 images with 17 grey levels", "holds 3x8x8 images")


def test_job_options_out_of_range_are_named(run, tmp_path, capsys) -> None:
    ckpt, data = str(run["ckpt"]), str(run["data"])
    manipulate = ["manipulate", "--ckpt", ckpt, "--data", data, "--out", str(tmp_path / "m.png")]
    for extra, text in (
        (["--attribute", "class=abc"], "class=K with K a class of"),
        (["--attribute", "class=0", "--direction-images", "0"], "--direction-images must be >= 2"),
        (["--attribute", "class=0", "--split", "dev"], "split 'dev'"),
    ):
        with pytest.raises(SystemExit):
            main([*manipulate, *extra])
        assert text in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "bpd", "--ckpt", ckpt, "--data", data, "--devices", "0"])
    assert "--devices '0'" in capsys.readouterr().err


def test_fid_inputs_that_are_not_what_they_claim_are_named(run, tmp_path, capsys) -> None:
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"not weights")
    args = ["evaluate", "fid", "--ckpt", str(run["ckpt"]), "--data", str(run["data"]), "--num-samples", "4"]
    fails(capsys, [*args, "--inception-weights", str(weights)], "not torch-fidelity's InceptionV3 weights")
    part = tmp_path / "part.pt"
    torch.save({"something": 1}, part)
    fails(capsys, ["evaluate", "fid-merge", str(part)], "part.pt: not a part of glowlab evaluate fid")
    (tmp_path / "text.pt").write_text("hello")
    fails(capsys, ["evaluate", "fid-merge", str(tmp_path / "text.pt")], "text.pt: not a part")


def test_every_json_glowlab_wrote_in_these_runs_is_valid(run) -> None:
    for path in [*run["log"].rglob("*.json"), run["data"] / "manifest.json"]:
        json.loads(path.read_text(), parse_constant=lambda c, path=path: pytest.fail(f"{path}: {c}"))
    assert read_manifest(str(run["data"]))["format"] == "glowlab-webdataset"


def test_the_command_line_shows_a_traceback_only_when_asked(run, tmp_path) -> None:
    code = "from glowlab.cli import main; main()"
    args = [sys.executable, "-c", code, "sample", "--ckpt", str(tmp_path / "missing.ckpt")]
    short = subprocess.run(args, capture_output=True, text=True)
    assert short.returncode == 2 and "Traceback" not in short.stderr and "missing.ckpt" in short.stderr
