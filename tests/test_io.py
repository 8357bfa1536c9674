"""Models without Lightning: glowlab.load, glowlab export, old checkpoints and old config keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import prepared
from PIL import Image

import glowlab
from glowlab.cli import main
from glowlab.models import MultiscaleConfig, MultiscaleFlow
from glowlab.models.io import config_from_hparams

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits.yaml"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_load_needs_no_lightning(run) -> None:
    # Lightning made unimportable: loading a checkpoint and computing with it must not touch it.
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['pytorch_lightning'] = None\n"
        "import torch, glowlab\n"
        f"model = glowlab.load({str(run['ckpt'])!r})\n"
        "x = torch.rand(2, *model.image_shape) - 0.5\n"
        "print(type(model).__name__, model.n_bins, tuple(model.log_prob(x).shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["MultiscaleFlow", "17", "(2,)"]


def test_export_writes_a_folder_that_every_job_takes(run, tmp_path, capsys) -> None:
    folder = tmp_path / "exported"
    main(["export", str(run["ckpt"]), str(folder)])
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    info = json.loads((folder / "config.json").read_text())
    results = json.loads((run["log"] / "test_results.json").read_text())
    assert info["format"] == "glowlab-model" and info["kind"] == "multiscale"
    assert info["config"]["n_bins"] == 17 and info["config"]["image_shape"] == [1, 8, 8]
    assert info["metrics"]["test_bpd"] == results["test_bpd"] and info["data"]["data"] == str(run["data"])
    card = (folder / "README.md").read_text()
    assert f"test_bpd: {results['test_bpd']}" in card and "glowlab.load" in card
    exported, checkpoint = glowlab.load(folder), glowlab.load(run["ckpt"])
    x = torch.rand(5, 1, 8, 8) - 0.5
    torch.testing.assert_close(exported.log_prob(x), checkpoint.log_prob(x), rtol=0, atol=0)
    # The jobs take the folder in place of the checkpoint, with the same results.
    data = str(run["data"])
    for ckpt in (str(run["ckpt"]), str(folder)):
        main(["evaluate", "bpd", "--ckpt", ckpt, "--data", data, "--draws", "1", "--out", str(tmp_path / "bpd.json")])
        assert json.loads((tmp_path / "bpd.json").read_text())["bpd"] == pytest.approx(results["test_bpd"], abs=1e-5)
    main(["sample", "--ckpt", str(folder), "--num-samples", "4", "--out", str(tmp_path / "s.png")])
    assert Image.open(tmp_path / "s.png").size[0] > 0
    main(["score", "--ckpt", str(folder), "--data", data, "--out", str(tmp_path / "scores.csv")])
    assert len((tmp_path / "scores.csv").read_text().splitlines()) == 359 + 1


def test_checkpoints_written_before_the_config_object_still_load(run, tmp_path) -> None:
    # An earlier checkpoint: flat hyperparameters with the old names, and splits beside the levels.
    checkpoint = torch.load(run["ckpt"], map_location="cpu", weights_only=False)
    config = config_from_hparams({"flow": checkpoint["hyper_parameters"].pop("flow")})
    checkpoint["hyper_parameters"].pop("_instantiator", None)
    old = {k: v for k, v in config.to_dict().items() if k not in ("architecture", "backprop")}
    checkpoint["hyper_parameters"].update(old, step=config.architecture, memory=config.backprop)
    renamed = {}
    for key, value in checkpoint["state_dict"].items():
        if ".split." in key:  # model.levels.0.split.prior.weight -> model.splits.0.prior.weight
            level, rest = key.split("levels.", 1)[1].split(".split.", 1)
            key = f"model.splits.{level}.{rest}"
        renamed[key] = value
    checkpoint["state_dict"] = renamed
    torch.save(checkpoint, tmp_path / "old.ckpt")
    x = torch.rand(4, 1, 8, 8) - 0.5
    old_model, new_model = glowlab.load(tmp_path / "old.ckpt"), glowlab.load(run["ckpt"])
    assert old_model.config == new_model.config
    torch.testing.assert_close(old_model.log_prob(x), new_model.log_prob(x), rtol=0, atol=0)


def test_load_names_files_that_are_not_models(tmp_path) -> None:
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    for name in ("empty.ckpt", "text.ckpt", "other.ckpt"):
        with pytest.raises(ValueError, match=f"{name}: not a glowlab checkpoint"):
            glowlab.load(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        glowlab.load(tmp_path / "missing.ckpt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match=r"needs config\.json and model\.safetensors"):
        glowlab.load(tmp_path / "folder")


def test_old_option_names_fail_naming_the_new_ones(tmp_path, capsys) -> None:
    old = tmp_path / "old.yaml"
    old.write_text(CONFIG.read_text().replace("  flow:\n    levels: 2", "  levels: 2\n  flow:"))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(old), "--trainer.max_steps", "1"])
    assert "model.levels is now model.flow.levels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIG), "--model.flow.step", "nice"])
    assert "model.flow.step is now called model.flow.architecture" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIG), "--model.memory", "invertible"])
    assert "model.memory is now model.flow.backprop" in capsys.readouterr().err
    with pytest.raises(TypeError, match="step is now called architecture"):
        MultiscaleFlow(image_shape=(1, 8, 8), levels=2, step="nice")
    with pytest.raises(TypeError, match="pass a MultiscaleConfig"):
        MultiscaleFlow((1, 8, 8))


def test_jobs_check_the_data_against_the_model_with_one_message(run, tmp_path, capsys) -> None:
    other = prepared(tmp_path / "rgb", n=8, shape=(3, 8, 8), shard_size=4)
    for job in (["evaluate", "bpd"], ["score"], ["interpolate"]):
        with pytest.raises(SystemExit):
            main([*job, "--ckpt", str(run["ckpt"]), "--data", str(other), "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert f"{run['ckpt']} models 1x8x8 images with 17 grey levels; {other} holds 3x8x8 images" in err, err
    config = MultiscaleConfig(image_shape=(1, 8, 8), n_bins=17, levels=2, steps=1, hidden_channels=4, num_classes=3)
    assert config.to_dict()["image_shape"] == [1, 8, 8]
