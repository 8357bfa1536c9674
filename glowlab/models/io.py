"""Trained models without Lightning: load a checkpoint or an exported folder, export a folder.

A Lightning checkpoint of ``glowlab fit`` (or ``glowlab density fit``) holds the model's config
under ``hyper_parameters["flow"]`` and its weights under ``state_dict`` with a ``model.`` prefix;
:func:`load` reads both with plain ``torch.load`` and builds the model, so no Lightning code runs.
:func:`export` writes a framework-free folder: ``model.safetensors`` (the weights),
``config.json`` (format, model kind, config, data contract, metrics) and ``README.md`` (a model
card). :func:`load` and every job take such a folder in place of a checkpoint, and it is what a
model hub expects (``huggingface_hub.upload_folder`` uploads it as is).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glowlab.files import write_atomic, write_json, write_text
from glowlab.models.density import FlowModel, VectorFlowConfig
from glowlab.models.multiscale import RENAMED, ImageFlow, MultiscaleConfig, image_flow

FORMAT = "glowlab-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
KINDS = {"multiscale": (MultiscaleConfig, image_flow), "vector": (VectorFlowConfig, FlowModel.from_config)}
# Which weights of a checkpoint trained with a weight average (model.ema_decay) to load: "auto" takes
# the average when there is one (what the run evaluated and sampled with), "ema" insists on it,
# "trained" takes the optimizer's weights.
WEIGHTS_CHOICES = ("auto", "ema", "trained")
EMA_PREFIX = "ema.model."
_default_weights = "auto"

Model = ImageFlow | FlowModel


def set_default_weights(choice: str) -> None:
    """The weights :func:`load` takes when not told (``--weights`` of every job sets it for its process)."""
    global _default_weights
    if choice not in WEIGHTS_CHOICES:
        raise ValueError(f"weights={choice!r}: choose one of {', '.join(WEIGHTS_CHOICES)}")
    _default_weights = choice


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The dict a ``glowlab fit`` checkpoint holds; an error naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint or exported model folder")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exn:  # truncated, empty or not a torch file at all
        raise ValueError(f"{path}: not a glowlab checkpoint (torch.load failed: {exn})") from exn
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(f"{path}: not a glowlab checkpoint (no state_dict and hyper_parameters)")
    return checkpoint


def config_from_hparams(hparams: dict[str, Any], where: str = "checkpoint") -> MultiscaleConfig | VectorFlowConfig:
    """The model config in a checkpoint's hyperparameters, also from checkpoints written before it was one object."""
    flow = hparams.get("flow")
    if isinstance(flow, MultiscaleConfig | VectorFlowConfig):
        return flow
    if isinstance(flow, dict):  # a config saved as plain values
        return (VectorFlowConfig if "family" in flow else MultiscaleConfig)(**flow)
    if "family" in hparams:  # an earlier density-lab checkpoint: the options were the module's own
        names = VectorFlowConfig.__dataclass_fields__
        return VectorFlowConfig(**{k: v for k, v in hparams.items() if k in names})
    if "levels" in hparams:  # an earlier image-model checkpoint
        options = {RENAMED.get(k, k): v for k, v in hparams.items()}
        names = MultiscaleConfig.__dataclass_fields__
        return MultiscaleConfig(**{k: v for k, v in options.items() if k in names})
    raise ValueError(f"{where}: its hyperparameters describe no glowlab model")


def _model_for(config: MultiscaleConfig | VectorFlowConfig) -> Model:
    if isinstance(config, MultiscaleConfig):
        return image_flow(config)
    return FlowModel.from_config(config)


def _kind(model: nn.Module) -> str:
    return "multiscale" if isinstance(model, ImageFlow) else "vector"


def load(path: str | Path, device: str | torch.device | None = None, weights: str | None = None) -> Model:
    """The model in ``path`` (a Lightning checkpoint or an exported folder), in eval mode on ``device``.

    Returns an image model (:class:`~glowlab.models.ImageFlow`: a multiscale or transformer flow;
    ``model.n_bins`` and ``model.image_shape`` say what data it is for) or a
    :class:`~glowlab.models.FlowModel` (vector flows). ``device`` defaults to the CPU. ``weights``
    (``"auto"``, ``"ema"`` or ``"trained"``; default: :func:`set_default_weights`'s) chooses between
    a checkpoint's weight average and its trained weights; ``model.weights`` says which it holds.
    """
    path = Path(path)
    if path.is_dir():
        model, state, stored = _read_exported(path)
        if (weights or _default_weights) not in ("auto", stored):
            raise ValueError(f"{path}: this exported model holds its {stored} weights only, not {weights!r}")
        model = _with_weights(model, state, path, device)
        model.weights = stored
        return model
    return model_from_checkpoint(read_checkpoint(path), path, device, weights)


def model_from_checkpoint(
    checkpoint: dict[str, Any], path: str | Path, device: str | torch.device | None = None, weights: str | None = None
) -> Model:
    """The model of a checkpoint already read with :func:`read_checkpoint` (``path`` names it in errors)."""
    weights = weights or _default_weights
    if weights not in WEIGHTS_CHOICES:
        raise ValueError(f"weights={weights!r}: choose one of {', '.join(WEIGHTS_CHOICES)}")
    model = _model_for(config_from_hparams(checkpoint["hyper_parameters"], str(path)))
    has_average = any(k.startswith(EMA_PREFIX) for k in checkpoint["state_dict"])
    if weights == "ema" and not has_average:
        raise ValueError(f"{path}: --weights ema, but this run kept no weight average (model.ema_decay was not set)")
    prefix = EMA_PREFIX if has_average and weights != "trained" else "model."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model = _with_weights(model, state, Path(path), device)
    model.weights = "ema" if prefix == EMA_PREFIX else "trained"
    return model


def _with_weights(model: Model, state: dict[str, torch.Tensor], path: Path, device: str | torch.device | None) -> Model:
    # The weights keep the precision they were saved in (float64 training stays float64).
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), None)
    if dtype is not None:
        model = model.to(dtype)
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{path}: parameter {name} has non-finite values; the model is broken")
    try:
        model.load_state_dict(state)
    except RuntimeError as exn:
        raise ValueError(f"{path}: its weights do not fit the model its config describes: {exn}") from exn
    return model.to(device or "cpu").eval()


def _read_exported(folder: Path) -> tuple[Model, dict[str, torch.Tensor], str]:
    from safetensors.torch import load_file

    config_path, weights = folder / CONFIG, folder / WEIGHTS
    if not config_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder}: an exported glowlab model needs {CONFIG} and {WEIGHTS}")
    info = json.loads(config_path.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{config_path}: not an exported glowlab model (format {info.get('format')!r})")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{config_path}: format version {info['format_version']} is newer than this glowlab's")
    if info.get("kind") not in KINDS:
        raise ValueError(f"{config_path}: unknown model kind {info.get('kind')!r}")
    config_class, _ = KINDS[info["kind"]]
    return _model_for(config_class(**info["config"])), load_file(str(weights)), info.get("weights", "trained")


def export(
    source: str | Path, out: str | Path, metrics: dict[str, Any] | None = None, data: dict[str, Any] | None = None
) -> Path:
    """Write the model of checkpoint (or folder) ``source`` as a framework-free folder ``out``.

    ``metrics`` (for example the run's test bits/dim) and ``data`` (what it was trained on) go
    into ``config.json`` and the model card; by default they are read from the run's
    ``test_results.json`` next to the checkpoint (the run folder holds ``checkpoints/``) when that
    file was written for this checkpoint.
    """
    source = Path(source)
    model = load(source)
    if metrics is None or data is None:
        found_metrics, found_data = _run_results(source)
        metrics = found_metrics if metrics is None else metrics
        data = found_data if data is None else data
    return save_model(model, out, metrics, data, str(source))


def save_model(
    model: Model,
    out: str | Path,
    metrics: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    source: str = "",
) -> Path:
    """Write an in-memory ``model`` (built from its config) as an exported folder ``out``."""
    from safetensors.torch import save

    out = Path(out)
    if model.config is None:
        raise ValueError("only a model built from its config (FlowModel.from_config, image_flow) can be saved")
    for name, value in (metrics or {}).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"metric {name}={value} is not finite: refusing to export it")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_atomic(out / WEIGHTS, lambda f: f.write(save(state)))
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": _kind(model),
        "config": model.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights": getattr(model, "weights", "trained"),
        "data": data or {},
        "metrics": metrics or {},
        "source": source,
    }
    write_json(out / CONFIG, info)
    write_text(out / "README.md", model_card(info))
    return out


def _run_results(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics and data of the run that wrote ``checkpoint``, from its ``test_results.json``."""
    if checkpoint.is_dir():
        info = json.loads((checkpoint / CONFIG).read_text())
        return info.get("metrics", {}), info.get("data", {})
    results = checkpoint.resolve().parent.parent / "test_results.json"
    if not results.is_file():
        return {}, {}
    found = json.loads(results.read_text())
    tested = Path(str(found.get("checkpoint", "")))
    # Paths may be relative to where the run started: the file and its folder identify it in the run.
    if (tested.name, tested.parent.name) != (checkpoint.name, checkpoint.parent.name):
        return {}, {}  # the test pass was of another checkpoint of the run (or of its final weights)
    metrics = {k: v for k, v in found.items() if k.startswith("test_")}
    data = {k: v for k, v in found.items() if k in ("data", "num_test_images", "num_test_vectors")}
    return metrics, data


def model_card(info: dict[str, Any]) -> str:
    """A short README for an exported model: what it is, what data it is for, how well it did, how to load it."""
    config = info["config"]
    classes = f", {config['num_classes']} classes" if config.get("num_classes") else ""
    if info["kind"] == "multiscale" and config.get("architecture") == "transformer":
        c, h, w = config["image_shape"]
        what = (
            f"A transformer autoregressive flow ({config['steps']} blocks of {config['layers_per_block']} causal "
            f"transformer layers, width {config['hidden_channels']}, {config['heads']} heads, "
            f"{config['patch_size']}x{config['patch_size']} patches{classes}) for {c}x{h}x{w} images with "
            f"{config['n_bins']} grey levels per channel."
        )
    elif info["kind"] == "multiscale":
        c, h, w = config["image_shape"]
        what = (
            f"A {config['architecture']} multiscale flow ({config['levels']} levels of {config['steps']} steps, "
            f"width {config['hidden_channels']}, {config['coupling']} coupling, {config['permutation']} "
            f"permutation{classes}) "
            f"for {c}x{h}x{w} images with {config['n_bins']} grey levels per channel."
        )
    else:
        what = (
            f"A {config['family']} flow of {config['layers']} layers on {config['features']}-dimensional vectors, "
            "with the training data's standardisation as its first layer."
        )
    if info["kind"] == "multiscale":
        what += f" Dequantization: {config.get('dequantization', 'uniform')}."
    if info.get("weights") == "ema":
        what += " The weights are the training run's exponential moving average."
    lines = [
        "# glowlab model",
        "",
        what,
        f"{info['parameters']:,} parameters.",
        "",
        "## Data and results",
        "",
    ]
    data, metrics = info.get("data") or {}, info.get("metrics") or {}
    lines += [f"- {key}: {value}" for key, value in data.items()] or ["- data set: not recorded"]
    lines += [f"- {key}: {value}" for key, value in metrics.items()] or ["- metrics: none recorded"]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import glowlab",
        "",
        'model = glowlab.load("path/to/this/folder")  # no Lightning needed',
        "```",
        "",
        "Every `glowlab` job takes this folder wherever it takes a checkpoint (`--ckpt`). The weights are",
        f"`{WEIGHTS}`; `{CONFIG}` holds the model's config and data contract.",
        "",
    ]
    return "\n".join(lines)
