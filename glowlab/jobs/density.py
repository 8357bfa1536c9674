"""The density lab's jobs: train every family on every data set into one NLL table; load models."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from glowlab.jobs.common import log_to_wandb, write_json
from glowlab.models.density import FlowModel


def load_density(ckpt: str | Path, device: str = "cpu") -> tuple[FlowModel, dict[str, Any]]:
    """The flow model of a density-lab checkpoint, in eval mode, and its hyperparameters."""
    from glowlab.training.density import DensityModule

    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt {path}: no such checkpoint")
    module = DensityModule.load_from_checkpoint(path, map_location=device)
    return module.model.eval(), dict(module.hparams)


def checkpoint_kind(ckpt: str | Path) -> str:
    """``"density"`` for a density-lab checkpoint, ``"glow"`` for an image model's."""
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt {path}: no such checkpoint")
    hparams = torch.load(path, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    if "family" in hparams:
        return "density"
    if "levels" in hparams:
        return "glow"
    raise ValueError(f"--ckpt {path}: neither a glowlab image model nor a density-lab checkpoint")


def log_likelihoods(model: FlowModel, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Per-vector log-density in nats, shape (N,), in batches (with autograd where a family needs it)."""
    with torch.enable_grad():
        return torch.cat([model.log_prob(part).detach() for part in x.split(batch_size)])


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of a 1-D tensor."""
    values = values.double()
    n = values.numel()
    return float(values.mean()), float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0


def dataset_name(source: str) -> str:
    """A folder-friendly name for a toy data set or a file."""
    return Path(source).stem if ("/" in source or "." in source) else source


def _cell(config: Path, source: str, out: Path, max_steps: int | None, seed: int, accelerator: str) -> dict:
    """Train one family (config) on one data set, evaluate its best checkpoint; the cell's result."""
    from glowlab.training.cli import DensityCLI, density_trainer_defaults
    from glowlab.training.density import DensityModule, VectorDataModule, density_panel, plot_bound

    name = dataset_name(source)
    cell = out / config.stem / name
    args = ["--config", str(config), "--data.source", source, "--seed_everything", str(seed)]
    args += ["--trainer.accelerator", accelerator, "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.enable_model_summary", "false"]
    if max_steps is not None:
        args += ["--trainer.max_steps", str(max_steps)]
    # One W&B run for the whole lab (--wandb-project), not one per cell.
    defaults = density_trainer_defaults(save_dir=str(out), name=config.stem, version=name, plots=False, wandb=False)
    cli = DensityCLI(DensityModule, VectorDataModule, args=args, run=False, trainer_defaults=defaults)
    last = cell / "checkpoints" / "last.ckpt"
    start = time.perf_counter()
    # An interrupted lab resumes each cell from its last checkpoint instead of starting over.
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(last) if last.is_file() else None)
    seconds = time.perf_counter() - start
    best = cli.trainer.checkpoint_callback.best_model_path or str(last)
    model, hparams = load_density(best)
    data = cli.datamodule
    nll, stderr = mean_and_stderr(-log_likelihoods(model, data.tensor("test")))
    result = {
        "family": hparams["family"],
        "config": config.stem,
        "data": name,
        "test_nll": nll,
        "test_nll_stderr": stderr,
        "num_test": len(data.splits["test"]),
        "features": data.features,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": cli.trainer.global_step,
        "train_seconds": round(seconds, 1),
        "checkpoint": best,
    }
    if data.features == 2:
        train = data.splits["train"]
        result["plot"] = str(cell / "density.png")
        result["plot_mass"] = density_panel(model, train[:5000], cell / "density.png", plot_bound(train))["mass"]
    write_json(cell / "result.json", result)
    return result


def write_table(results: Sequence[dict], out: Path) -> Path:
    """``table.md`` (configs x data sets, test NLL ± s.e. in nats), ``table.csv`` and ``results.json``."""
    configs = list(dict.fromkeys(r["config"] for r in results))
    datasets = list(dict.fromkeys(r["data"] for r in results))
    cells = {(r["config"], r["data"]): r for r in results}
    lines = [
        "Held-out negative log-likelihood, nats per vector (mean ± standard error; lower is better).",
        "",
        "| family | " + " | ".join(datasets) + " |",
        "|---|" + "---|" * len(datasets),
    ]
    for config in configs:
        row = []
        for data in datasets:
            r = cells.get((config, data))
            row.append(f"{r['test_nll']:.3f} ± {r['test_nll_stderr']:.3f}" if r else "")
        lines.append(f"| {config} | " + " | ".join(row) + " |")
    table = out / "table.md"
    table.write_text("\n".join(lines) + "\n")
    with (out / "table.csv").open("w", newline="") as f:
        fields = ["config", "family", "data", "test_nll", "test_nll_stderr", "num_test", "parameters", "steps"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    write_json(out / "results.json", {"results": list(results)})
    return table


def run_lab(
    configs: Sequence[str | Path],
    datasets: Sequence[str],
    out: str | Path = "runs/lab",
    max_steps: int | None = None,
    seed: int = 0,
    accelerator: str = "cpu",
    wandb_project: str | None = None,
) -> Path:
    """Train every config on every data set (cells already finished are reused) and write the table."""
    out = Path(out)
    paths = [Path(c) for c in configs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--configs: no such file {missing[0]}")
    if not paths or not datasets:
        raise ValueError("the lab needs at least one config and one data set")
    results = []
    for config in paths:
        for source in datasets:
            done = out / config.stem / dataset_name(source) / "result.json"
            if done.is_file():
                results.append(json.loads(done.read_text()))
                print(f"{config.stem} on {dataset_name(source)}: done before, reusing {done}")
                continue
            result = _cell(config, source, out, max_steps, seed, accelerator)
            nll, stderr = result["test_nll"], result["test_nll_stderr"]
            print(f"{config.stem} on {result['data']}: test NLL {nll:.3f} ± {stderr:.3f}")
            results.append(result)
    table = write_table(results, out)
    print(table.read_text(), end="")
    images = {f"{r['config']}/{r['data']}": Path(r["plot"]) for r in results if "plot" in r}
    metrics = {f"{r['config']}/{r['data']}/test_nll": r["test_nll"] for r in results}
    log_to_wandb(
        wandb_project, "lab", {"configs": [str(p) for p in paths], "datasets": list(datasets)}, images, metrics
    )
    return table
