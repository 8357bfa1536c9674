import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
# The configs log to W&B as well; tests run it disabled unless a test asks for offline mode.
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def run(tmp_path_factory) -> dict[str, Path]:
    """Digits prepared and a brief training run through the CLI, as a user starts the main job.

    ``data``: the prepared folder; ``ckpt``: the run's best checkpoint; ``log``: the run folder
    (metrics.csv, test_results.json). Shared by the job and model-loading tests.
    """
    from datasets import prepared_digits
    from helpers import working_directory

    from glowlab.cli import main

    root = prepared_digits(tmp_path_factory.mktemp("digits"), shard_size=400)
    logs = tmp_path_factory.mktemp("logs")
    config = ROOT / "configs" / "digits.yaml"
    args = ["fit", "--config", str(config), "--data.root", str(root), "--trainer.max_steps", "120"]
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    with working_directory(logs):
        main([*args, "--model.flow.steps", "4", *quiet])
    version = logs / "runs" / "digits" / "version_0"
    return {"data": root, "ckpt": version / "checkpoints" / "best.ckpt", "log": version}
