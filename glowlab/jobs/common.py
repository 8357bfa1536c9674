"""Shared pieces of the jobs: loading checkpoints, choosing devices, images for display."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glowlab.models import Glow


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_glow(ckpt: str | Path, device: str | None = None) -> tuple[Glow, int]:
    """The Glow of a ``glowlab fit`` checkpoint, in eval mode on ``device``, and its ``n_bins``."""
    from glowlab.training.module import GlowModule

    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt {path}: no such checkpoint")
    module = GlowModule.load_from_checkpoint(path, map_location=device or default_device())
    return module.model.eval(), int(module.hparams.n_bins)


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def log_to_wandb(
    project: str | None, job: str, config: dict, images: dict[str, Path], metrics: dict | None = None
) -> None:
    """Log a job's PNGs and numbers to W&B (offline unless WANDB_MODE says otherwise)."""
    if not project:
        return
    import os

    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")  # compute nodes need no network; `wandb sync` later
    run = wandb.init(project=project, job_type=job, config=config)
    run.log({**(metrics or {}), **{k: wandb.Image(str(v)) for k, v in images.items()}})
    run.finish()
