"""Wall time of the README's main job (prepare digits, fit configs/digits.yaml, test) on a device.

Each variant runs ``glowlab prepare digits`` into a fresh folder and ``glowlab fit --config
configs/digits.yaml`` (2000 steps, batch 64, test of the best checkpoint) in a fresh process and
reports its wall time, the fit's wall time alone, the test bits/dim, the peak RSS of the largest
process so far (``ru_maxrss`` of the finished children) and the model TFLOP/s per device and MFU
of the last window ``Throughput`` logged (no MFU where no peak is known). ``--accelerator gpu`` runs
the same job on one GPU; ``--variant cuda_graphs`` adds ``--model.cuda_graphs true``, ``compile``
adds ``--model.compile true``. ``--no-wandb`` keeps only the CSV logger (for machines without wandb).
Other arguments go to ``glowlab fit`` (e.g. ``--threads 1``); ``--keep DIR`` keeps the run.

    python benchmarks/main_job.py                                   # the CPU figure of the README
    python benchmarks/main_job.py --accelerator gpu --variant eager cuda_graphs --no-wandb
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"eager": [], "cuda_graphs": ["--model.cuda_graphs", "true"], "compile": ["--model.compile", "true"]}
CSV_ONLY = (
    '[{"class_path": "glowlab.training.ResumableCSVLogger", "init_args": {"save_dir": "runs", "name": "digits"}}]'
)


def run(accelerator: str, variant: str, extra: list[str], wandb: bool, keep: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
        glowlab = [sys.executable, "-m", "glowlab"]
        start = time.perf_counter()
        subprocess.run([*glowlab, "prepare", "digits", "--out", f"{work}/digits"], check=True, cwd=work, env=env)
        fit_start = time.perf_counter()
        cmd = [*glowlab, "fit", "--config", str(ROOT / "configs" / "digits.yaml"), "--data.root", f"{work}/digits"]
        cmd += ["--trainer.accelerator", accelerator, "--trainer.enable_progress_bar", "false", *VARIANTS[variant]]
        cmd += [] if wandb else ["--trainer.logger", CSV_ONLY]
        result = subprocess.run([*cmd, *extra], cwd=work, env=env, capture_output=True, text=True)
        end = time.perf_counter()
        if result.returncode != 0:
            raise SystemExit(f"{variant} on {accelerator} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        run_dir = next(Path(work, "runs", "digits").glob("version_*/test_results.json")).parent
        results = json.loads((run_dir / "test_results.json").read_text())
        flops = last_logged(run_dir / "metrics.csv", ("throughput/tflops_per_sec_per_device", "throughput/mfu"))
        if keep is not None:
            shutil.copytree(work, keep / variant, dirs_exist_ok=True)
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    return {
        "wall_s": end - start,
        "fit_s": end - fit_start,
        "test_bpd": results["test_bpd"],
        "peak_rss_gib": peak_gib,
        "tflops_per_device": flops["throughput/tflops_per_sec_per_device"],
        "mfu": flops["throughput/mfu"],
    }


def last_logged(metrics_csv: Path, names: tuple[str, ...]) -> dict[str, float | None]:
    """The last value the run logged under each name in its ``metrics.csv`` (None: never logged)."""
    last: dict[str, float | None] = dict.fromkeys(names)
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            last.update({name: float(row[name]) for name in names if row.get(name)})
    return last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--variant", nargs="+", default=["eager"], choices=tuple(VARIANTS))
    parser.add_argument("--no-wandb", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--keep", type=Path, help="copy each variant's data and run folder to KEEP/VARIANT")
    args, extra = parser.parse_known_args()
    rows = {}
    for variant in args.variant:
        row = run(args.accelerator, variant, extra, wandb=not args.no_wandb, keep=args.keep)
        rows[variant] = row
        print(
            f"main job on {args.accelerator} ({variant}): {row['wall_s']:.1f} s in all, fit and test "
            f"{row['fit_s']:.1f} s, test bits/dim {row['test_bpd']:.4f}, peak RSS {row['peak_rss_gib']:.2f} GiB, "
            f"model TFLOP/s {_figure(row['tflops_per_device'], '.4f')}, MFU {_figure(row['mfu'], '.2%')} "
            "(the last window's)",
            flush=True,
        )
        if args.json:  # after each variant: a time limit that stops a later one keeps this one's figures
            Path(args.json).write_text(json.dumps(rows, indent=2, allow_nan=False))


def _figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
