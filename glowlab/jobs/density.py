"""The density lab's job: train every family on every data set into one held-out NLL table."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path

from glowlab.files import write_json, write_text
from glowlab.jobs.args import job_parser
from glowlab.jobs.common import load_vector_model, log_to_wandb
from glowlab.likelihood import mean_and_stderr
from glowlab.models.density import log_densities
from glowlab.plots import density_panel, plot_bound


def dataset_name(source: str) -> str:
    """A folder-friendly name for a toy data set or a file."""
    return Path(source).stem if ("/" in source or "." in source) else source


def _cell(config: Path, source: str, out: Path, max_steps: int | None, seed: int, accelerator: str) -> dict:
    """Train one family (config) on one data set, evaluate its best checkpoint; the cell's result."""
    from glowlab.training.cli import DensityCLI, density_trainer_defaults
    from glowlab.training.density import DensityModule, VectorDataModule

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
    model = load_vector_model(best)
    data = cli.datamodule
    nll, stderr = mean_and_stderr(-log_densities(model, data.tensor("test")))
    result = {
        "family": model.config.family,
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
    write_text(table, "\n".join(lines) + "\n")
    rows = io.StringIO()
    fields = ["config", "family", "data", "test_nll", "test_nll_stderr", "num_test", "parameters", "steps"]
    writer = csv.DictWriter(rows, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(results)
    write_text(out / "table.csv", rows.getvalue())
    write_json(out / "results.json", {"results": list(results)})
    return table


def run_lab(
    *,
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


def lab_main(argv: list[str]) -> Path:
    """``glowlab lab``: train each density config on each data set; write the held-out NLL table."""
    from glowlab.data.toy import TOY_DATASETS

    parser = job_parser("glowlab lab", lab_main.__doc__, small_model=True)
    parser.add_argument("--configs", nargs="+", required=True, help="density configs (configs/density/*.yaml)")
    parser.add_argument(
        "--datasets", nargs="+", default=list(TOY_DATASETS), help="toy data set names and/or .npz/.csv files"
    )
    parser.add_argument("--max-steps", type=int, help="override every config's trainer.max_steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--out", default="runs/lab")
    parser.add_argument("--wandb-project")
    args = parser.parse_args(argv)
    return run_lab(
        configs=args.configs,
        datasets=args.datasets,
        out=args.out,
        max_steps=args.max_steps,
        seed=args.seed,
        accelerator=args.accelerator,
        wandb_project=args.wandb_project,
    )
