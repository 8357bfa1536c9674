"""Shared pieces of the jobs: loading a model, checking it against data, devices, result files."""

from __future__ import annotations

from pathlib import Path

import torch

from glowlab.data.shards import DataContract, data_contract
from glowlab.models import FlowModel, ImageFlow
from glowlab.models.contract import mismatch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_image_model(ckpt: str | Path, device: str | None = None) -> ImageFlow:
    """The image model of ``--ckpt`` (a checkpoint or an exported folder), in eval mode.

    With the weights ``--weights`` chooses (a run's weight average by default, when it kept one);
    ``model.weights`` says which, and the jobs write it into their results.
    """
    from glowlab.models.io import load

    model = load(ckpt, device or default_device())
    if not isinstance(model, ImageFlow):
        raise ValueError(f"--ckpt {ckpt}: a vector flow of the density lab; this job needs an image model")
    return model


def load_vector_model(ckpt: str | Path, device: str = "cpu") -> FlowModel:
    """The vector flow of ``--ckpt`` (a density-lab checkpoint or an exported folder), in eval mode."""
    from glowlab.models.io import load

    model = load(ckpt, device)
    if not isinstance(model, FlowModel):
        raise ValueError(f"--ckpt {ckpt}: an image model; this job needs a vector flow of the density lab")
    return model


def check_data(model: ImageFlow, ckpt: str | Path, root: str, n_bits: int | None = None) -> DataContract:
    """The data contract of ``root``, which must match the model's: shape, grey levels, classes.

    The one check every job that puts data through a trained image model makes; the message
    names both sides.
    """
    data = data_contract(root, n_bits=n_bits)
    message = mismatch(model.config, data, str(ckpt), root)
    if message:
        raise ValueError(message)
    return data


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
