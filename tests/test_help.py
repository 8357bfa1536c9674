"""The command line's help and errors: `glowlab --help`, every job's defaults, the choices of typed options.

Most tests call :func:`glowlab.cli.main` in-process; the ones about imports and the error output of a
whole run start ``python -m glowlab``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest

from glowlab import cli
from glowlab.data.shards import BAD_SAMPLE_POLICIES, DataError, read_manifest
from glowlab.flows import COUPLINGS, PERMUTATIONS
from glowlab.flows.priors import CONDITIONINGS
from glowlab.flows.squeeze import MEMORY_FORMATS
from glowlab.models.density import FAMILIES, FamilyName
from glowlab.models.multiscale import ARCHITECTURES, Architecture, Conditioning, Coupling, MemoryFormat, Permutation
from glowlab.training.datamodule import BadSamples
from glowlab.training.module import OPTIMIZERS, OptimizerName

ROOT = Path(__file__).resolve().parents[1]
HELP_NAMES = [name for _, rows in cli.HELP for name, _ in rows]


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[Any, str, str]:
    """``glowlab ARGV`` in-process: its exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def glowlab(*argv: str, python: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``python [PYTHON] -m glowlab ARGV`` in a fresh interpreter."""
    command = [sys.executable, *python, "-m", "glowlab", *argv]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_help_lists_every_command_once() -> None:
    assert len(HELP_NAMES) == len(set(HELP_NAMES)), HELP_NAMES
    assert set(HELP_NAMES) == set(cli.COMMANDS) | set(cli.LIGHTNING) | {"density"}


def test_top_level_help_lists_the_commands_without_importing_torch() -> None:
    done = glowlab("--help", python=("-X", "importtime"))
    assert done.returncode == 0, done.stderr
    for name in HELP_NAMES:
        assert re.search(rf"^  {re.escape(name)} +\S", done.stdout, re.MULTILINE), name
    # -X importtime writes one line per imported module to stderr: "import time: self | cumulative | name".
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()}
    assert "glowlab" in imported
    assert not imported & {"torch", "lightning", "pytorch_lightning", "jsonargparse"}


@pytest.mark.parametrize(
    ("literal", "registry"),
    [
        (Architecture, [*ARCHITECTURES, "transformer"]),  # the level architectures and the transformer flow
        (Coupling, COUPLINGS),
        (Permutation, PERMUTATIONS),
        (MemoryFormat, MEMORY_FORMATS),
        (Conditioning, CONDITIONINGS),
        (FamilyName, FAMILIES),
        (OptimizerName, OPTIMIZERS),
        (BadSamples, BAD_SAMPLE_POLICIES),
    ],
)
def test_option_types_name_exactly_their_registry(literal: Any, registry: Any) -> None:
    assert sorted(get_args(literal)) == sorted(registry)


@pytest.mark.parametrize(
    ("command", "option", "default"),
    [
        ("sample", "--num-samples", "64"),
        ("interpolate", "--steps", "8"),
        ("manipulate", "--direction-images", "2000"),
        ("score", "--out", "scores.csv"),
        ("export", "--threads", "auto"),
        ("verify", "--threads", "auto"),
        ("prepare", "--shard-size", "5000"),
        ("lab", "--out", "runs/lab"),
        ("fit-target", "--steps", "5000"),
        ("distill", "--steps", "3000"),
        ("evaluate bpd", "--draws", "4"),
        ("evaluate fid", "--num-samples", "10000"),
        ("evaluate fid-merge", "--out", "fid.json"),
        ("evaluate train-classifier", "--epochs", "15"),
    ],
)
def test_job_help_shows_defaults(capsys, command: str, option: str, default: str) -> None:
    code, out, _ = run_main(capsys, *command.split(), "--help")
    assert code == 0
    text = " ".join(out.split())  # argparse wraps lines to the terminal's width
    assert text.startswith(f"usage: glowlab {command} ")
    options = text.split(" options: ", 1)[1]
    # The option's entry (up to the next option) ends with its default.
    assert re.search(rf"{option} (?:(?! --).)*?default: {re.escape(default)}\b", options), options


def test_fit_help_lists_the_choices_of_the_flow(capsys) -> None:
    code, out, _ = run_main(capsys, "fit", "--help")
    assert code == 0
    assert "--model.flow.coupling {affine,additive,checkerboard}" in out
    assert "--model.flow.permutation {lu,conv,reverse,shuffle}" in out


def test_a_value_outside_the_choices_is_one_line() -> None:
    done = glowlab("fit", "--config", str(ROOT / "configs" / "digits.yaml"), "--model.flow.coupling", "bogus")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "--model.flow.coupling bogus: choose one of affine, additive, checkerboard" in line


def test_an_unknown_command_suggests_the_nearest(capsys) -> None:
    code, out, err = run_main(capsys, "sampel")
    assert code == 2 and not out
    assert "did you mean 'sample'" in err


@pytest.mark.parametrize(
    ("folder", "hint"),
    [
        ("cifar10", "`glowlab prepare cifar10 PATH/cifar-10-python.tar.gz --out {root}`"),
        ("CIFAR-10", "`glowlab prepare cifar10 PATH/cifar-10-python.tar.gz --out {root}`"),
        ("cifar100", "`glowlab prepare cifar100 PATH/cifar-100-python.tar.gz --out {root}`"),
        ("digits", "`glowlab prepare digits --out {root}`"),
        ("celeba", "`glowlab prepare folder PATH/images --out {root}`"),
    ],
)
def test_a_missing_data_folder_says_how_to_prepare_it(tmp_path: Path, folder: str, hint: str) -> None:
    root = str(tmp_path / folder)
    with pytest.raises(DataError) as error:
        read_manifest(root)
    message = str(error.value)
    assert f"{root}/manifest.json" in message and hint.format(root=root) in message
    assert (folder == "digits") == ("prepare digits" in message)


def test_help_command_is_the_command_help(capsys) -> None:
    via_help = run_main(capsys, "help", "sample")
    via_flag = run_main(capsys, "sample", "--help")
    assert via_help == via_flag
    assert via_help[0] == 0 and via_help[1].startswith("usage: glowlab sample ")
