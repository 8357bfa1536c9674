"""The density lab end to end: configs, `glowlab density fit`, the NLL table, scoring, reverse KL, distillation."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import perturb, working_directory
from PIL import Image

import glowlab
from glowlab.cli import main
from glowlab.jobs.target import distill, fit_target, kl_estimate
from glowlab.models.density import FlowModel, VectorFlowConfig, log_densities, make_vector_flow
from glowlab.plots import DPI, PANEL_SIZE, grid_points
from glowlab.targets import energy, log_normaliser
from glowlab.training.cli import DensityCLI, density_trainer_defaults
from glowlab.training.density import DensityModule, VectorDataModule

ROOT = Path(__file__).resolve().parents[1]
DENSITY_CONFIGS = sorted((ROOT / "configs" / "density").glob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def read_figure(path: Path) -> np.ndarray:
    """A PNG's pixels, (H, W, 3)."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def titled_figure_shape(panels: int) -> tuple[int, int]:
    """(height, width) in pixels of a figure of ``panels`` side by side under a title."""
    return round((PANEL_SIZE[1] + 0.3) * DPI), round(panels * PANEL_SIZE[0] * DPI)


def test_there_are_density_configs() -> None:
    names = {p.stem for p in DENSITY_CONFIGS}
    assert names >= {"maf", "iaf", "realnvp", "nice", "spline-coupling", "iresnet", "irevnet", "cnf", "lu-spline"}


@pytest.mark.parametrize("config", DENSITY_CONFIGS, ids=[p.stem for p in DENSITY_CONFIGS])
def test_every_density_config_instantiates(config: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(config), "--data.n_train", "64", "--data.n_val", "16", "--data.n_test", "16", *QUIET]
    cli = DensityCLI(DensityModule, VectorDataModule, args=args, run=False, trainer_defaults=density_trainer_defaults())
    assert cli.model.model.config.family == config.stem
    assert cli.model.model.config.features == 2 and len(cli.model.model.config.mean) == 2
    assert cli.trainer.checkpoint_callback.monitor == "val_nll"
    x = cli.datamodule.tensor("val")
    with torch.enable_grad():
        assert torch.isfinite(cli.model.model.log_prob(x)).all()


def write_csv(path: Path, x: np.ndarray) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"x{i}" for i in range(x.shape[1])])
        writer.writerows(x.tolist())
    return path


@pytest.fixture(scope="module")
def density_run(tmp_path_factory) -> Path:
    """`glowlab density fit` of a small MAF on a user CSV file of 3-D vectors (not standardised)."""
    root = tmp_path_factory.mktemp("density")
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1500, 3))
    x = np.stack([z[:, 0] * 5 + 10, z[:, 1] + 0.5 * z[:, 0] ** 2, 0.1 * z[:, 2] - 3], axis=1)
    data = write_csv(root / "vectors.csv", x)
    with working_directory(root):
        main(
            [
                *["density", "fit", "--config", str(ROOT / "configs" / "density" / "maf.yaml")],
                *["--data.source", str(data), "--trainer.max_steps", "150", "--data.batch_size", "128", *QUIET],
            ]
        )
    return root


def test_density_fit_writes_checkpoints_results_and_learns(density_run: Path) -> None:
    run = density_run / "runs" / "density" / "version_0"
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    results = json.loads((run / "test_results.json").read_text())
    assert results["family"] == "maf" and results["num_test_vectors"] == 150
    model = glowlab.load(run / "checkpoints" / "best.ckpt")
    assert model.config.features == 3
    # The standardisation inside the model: an untrained MAF (identity body) is the Gaussian fit by
    # moments; training beats it on the curved second coordinate.
    untrained = FlowModel.from_config(model.config).double()
    x = torch.as_tensor(np.loadtxt(density_run / "vectors.csv", delimiter=",", skiprows=1)[-150:])
    assert float(log_densities(model.double(), x).mean()) > float(log_densities(untrained, x).mean()) + 0.1
    assert math.isfinite(results["test_nll"])
    assert not (run / "plots").exists()  # 3-D data: no 2-D plots


def test_score_vectors_matches_the_test_nll(density_run: Path, tmp_path) -> None:
    ckpt = density_run / "runs" / "density" / "version_0" / "checkpoints" / "best.ckpt"
    out = tmp_path / "scores.csv"
    main(["score", "--ckpt", str(ckpt), "--data", str(density_run / "vectors.csv"), "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 150 and set(rows[0]) == {"index", "log_likelihood_nats", "bits_per_dim"}
    results = json.loads((density_run / "runs" / "density" / "version_0" / "test_results.json").read_text())
    mean_nll = -np.mean([float(r["log_likelihood_nats"]) for r in rows])
    assert abs(mean_nll - results["test_nll"]) < 1e-3
    assert abs(float(rows[0]["bits_per_dim"]) + float(rows[0]["log_likelihood_nats"]) / (3 * math.log(2))) < 1e-5


def test_score_errors_are_one_line(density_run: Path, tmp_path, capsys) -> None:
    ckpt = density_run / "runs" / "density" / "version_0" / "checkpoints" / "best.ckpt"
    with pytest.raises(SystemExit):
        main(["score", "--ckpt", str(ckpt), "--data", "moons", "--out", str(tmp_path / "s.csv")])
    assert "moons: vectors have 2 features but" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["score", "--ckpt", str(tmp_path / "none.ckpt"), "--data", "moons"])
    assert "no such checkpoint" in capsys.readouterr().err


def test_lab_writes_the_table_and_plots_and_reuses_finished_cells(tmp_path, capsys) -> None:
    configs = [str(ROOT / "configs" / "density" / f"{name}.yaml") for name in ("realnvp", "lu-spline")]
    out = tmp_path / "lab"
    args = ["lab", "--configs", *configs, "--datasets", "moons", "8gaussians", "--max-steps", "40", "--out", str(out)]
    main(args)
    table = (out / "table.md").read_text()
    assert "| realnvp |" in table and "| lu-spline |" in table and "moons" in table and "8gaussians" in table
    results = json.loads((out / "results.json").read_text())["results"]
    assert len(results) == 4 and all(math.isfinite(r["test_nll"]) for r in results)
    for r in results:
        pixels = read_figure(Path(r["plot"]))
        assert pixels.shape[:2] == titled_figure_shape(3)  # data | log density | samples
        assert 0.5 < r["plot_mass"] < 1.02  # normalised; after 40 steps some mass is still outside the window
    capsys.readouterr()
    main(args)
    assert capsys.readouterr().out.count("done before, reusing") == 4


def test_fit_target_reaches_a_small_kl(tmp_path) -> None:
    metrics = fit_target(
        target="u1",
        out=tmp_path / "u1",
        family="realnvp",
        layers=6,
        hidden_features=32,
        steps=1200,
        batch_size=256,
        lr=3e-3,
    )
    assert metrics["kl"] < 0.1, metrics
    assert read_figure(tmp_path / "u1" / "target.png").shape[:2] == titled_figure_shape(3)
    fitted = glowlab.load(tmp_path / "u1" / "model")  # the exported model gives the density the KL was of
    x = torch.randn(64, 2)
    assert fitted.config.family == "realnvp" and torch.isfinite(fitted.log_prob(x)).all()


def test_kl_estimate_matches_numerical_integration() -> None:
    # The Monte-Carlo KL the job reports equals sum q log(q/p) on a grid, for any flow.
    torch.manual_seed(0)
    model = perturb(FlowModel(make_vector_flow("realnvp", 2, 4, 16, 1), 2).double(), 0.05).eval()
    assert float(model.sample(100000).abs().max()) < 6.0  # the grid below holds all of q's mass
    log_z = log_normaliser("u1")
    mc, stderr = kl_estimate(model, lambda x: -energy("u1", x) - log_z, 200000)
    points, area = grid_points(7.0, 400)
    grid = torch.as_tensor(points)
    log_q = model.log_prob(grid).detach()
    log_p = -energy("u1", grid) - log_z
    exact = float((log_q.exp() * (log_q - log_p)).sum() * area)
    assert abs(mc - exact) < 4 * stderr + 0.01, (mc, exact, stderr)


def save_teacher(path: Path, features: int = 2) -> Path:
    """A perturbed (non-trivial) two-layer MAF saved as a density-lab checkpoint."""
    import lightning

    torch.manual_seed(0)
    teacher = DensityModule(
        VectorFlowConfig(features=features, family="maf", layers=2, hidden_features=16, hidden_layers=1)
    )
    perturb(teacher, 0.3)
    checkpoint = {
        "state_dict": teacher.state_dict(),
        "hyper_parameters": dict(teacher.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    torch.save(checkpoint, path)
    return path


def test_distilled_student_matches_its_teacher(tmp_path) -> None:
    ckpt = save_teacher(tmp_path / "teacher.ckpt")
    metrics = distill(teacher=ckpt, out=tmp_path / "student", steps=600, batch_size=256, lr=3e-3, timing_samples=2000)
    assert metrics["student_family"] == "iaf"
    assert metrics["kl_student_teacher"] < 0.03 and metrics["kl_teacher_student"] < 0.05, metrics
    student = glowlab.load(tmp_path / "student" / "student")
    assert student.config.family == "iaf" and metrics["sampling_speedup"] > 0
    assert isinstance(student, FlowModel)
    # Teacher and student densities, student samples, the training curve, and a title line.
    assert metrics["plot"] == str(tmp_path / "student" / "distill.png")
    pixels = read_figure(tmp_path / "student" / "distill.png")
    assert pixels.shape[:2] == titled_figure_shape(4)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # colour-mapped densities, not an empty canvas


def test_distill_plots_the_training_curve_alone_beyond_two_dimensions(tmp_path) -> None:
    ckpt = save_teacher(tmp_path / "teacher.ckpt", features=3)
    metrics = distill(teacher=ckpt, out=tmp_path / "student", steps=20, kl_samples=500, timing_samples=100)
    assert metrics["features"] == 3
    pixels = read_figure(Path(metrics["plot"]))
    assert pixels.shape[:2] == titled_figure_shape(1)  # the training curve alone


def test_distill_command_on_a_teacher_trained_on_moons(tmp_path) -> None:
    # The user's path end to end: `glowlab density fit` a MAF on a toy set, then `glowlab distill`.
    with working_directory(tmp_path):
        main(
            [
                *["density", "fit", "--config", str(ROOT / "configs" / "density" / "maf.yaml")],
                *["--data.source", "moons", "--data.n_train", "4000", "--trainer.max_steps", "150", *QUIET],
            ]
        )
        teacher = tmp_path / "runs" / "density" / "version_0" / "checkpoints" / "last.ckpt"
        main(["distill", "--teacher", str(teacher), "--steps", "800", "--lr", "3e-3", "--out", "student"])
    metrics = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert metrics["student_family"] == "iaf" and metrics["features"] == 2
    assert (tmp_path / "student" / "distill.png").is_file()
    assert metrics["kl_student_teacher"] < 0.1, metrics
    scores = tmp_path / "scores.csv"
    main(["score", "--ckpt", str(tmp_path / metrics["student"]), "--data", "moons", "--out", str(scores)])
    assert len(list(csv.DictReader(scores.open()))) == 5000


def test_fit_target_command_writes_metrics_and_names_bad_options(tmp_path, capsys) -> None:
    out = tmp_path / "u2"
    main(["fit-target", "--target", "u2", "--family", "iaf", "--layers", "2", "--steps", "50", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["family"] == "iaf" and metrics["steps"] == 50 and math.isfinite(metrics["kl"])
    with pytest.raises(SystemExit):
        main(["fit-target", "--target", "u2", "--family", "iaf", "--options", '{"lipschitz": 0.5}', "--out", str(out)])
    assert "family 'iaf' has no option 'lipschitz'" in capsys.readouterr().err
