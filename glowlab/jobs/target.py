"""Reverse-KL jobs: fit a flow to an unnormalised density, and distil a MAF into an IAF.

Both minimise ``KL(q || p) = E_{x~q}[log q(x) - log p(x)]`` with samples drawn from the flow ``q``
itself (reparameterised), so the flow needs cheap sampling *with* its log-density: IAF, planar,
radial and CNF layers give both in one pass, coupling flows in one pass each way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from glowlab.files import write_json
from glowlab.jobs.args import job_parser
from glowlab.jobs.common import load_vector_model, log_to_wandb
from glowlab.likelihood import mean_and_stderr
from glowlab.models.density import FlowModel, VectorFlowConfig, log_densities
from glowlab.models.io import save_model
from glowlab.plots import Curve, Heatmap, Panel, Scatter, grid_points, plot_bound, save_panels
from glowlab.targets import ENERGIES, energy, energy_window, log_normaliser


def reverse_kl_train(
    model: FlowModel,
    log_target: Callable[[Tensor, float], Tensor],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    clip: float = 10.0,
    anneal_steps: int = 0,
    log_every: int = 0,
) -> list[float]:
    """Adam on ``E_q[log q(x) - beta · log p~(x)]``; ``beta`` rises linearly from 0.01 to 1 over ``anneal_steps``.

    ``log_target(x, beta)`` is the (tempered) unnormalised log-density. Annealing, as in Rezende &
    Mohamed, lets the flow spread before the target's modes pull it in, which avoids collapsing onto
    one mode. Returns the loss of every step (for a training curve); prints it every ``log_every`` steps.
    """
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    losses = []  # detached tensors: reading each as a float would synchronise a GPU every step
    model.train()
    for step in range(steps):
        beta = min(1.0, 0.01 + step / anneal_steps) if anneal_steps > 0 else 1.0
        x, log_q = model.sample_with_log_prob(batch_size)
        loss = (log_q - log_target(x, beta)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  beta {beta:.2f}  loss {float(losses[-1]):.4f}")
    model.eval()
    return torch.stack(losses).tolist() if losses else []


def kl_estimate(
    model: FlowModel, log_p: Callable[[Tensor], Tensor], samples: int, batch_size: int = 4096
) -> tuple[float, float]:
    """Monte-Carlo ``KL(q || p)`` in nats (mean and standard error) with ``p`` normalised."""
    parts = []
    with torch.no_grad():
        for start in range(0, samples, batch_size):
            x, log_q = model.sample_with_log_prob(min(batch_size, samples - start))
            parts.append(log_q - log_p(x))
    return mean_and_stderr(torch.cat(parts))


def _grid_log_density(model: FlowModel, bound: float, resolution: int) -> np.ndarray:
    points, _ = grid_points(bound, resolution)
    grid = torch.as_tensor(points, dtype=next(model.parameters()).dtype)
    return log_densities(model, grid).double().numpy().reshape(resolution, resolution)


def fit_target(
    *,
    target: str,
    out: str | Path,
    family: str = "realnvp",
    layers: int = 8,
    hidden_features: int = 64,
    hidden_layers: int = 2,
    options: dict[str, Any] | None = None,
    steps: int = 5000,
    batch_size: int = 512,
    lr: float = 1e-3,
    anneal_steps: int = 1000,
    seed: int = 0,
    kl_samples: int = 20000,
    resolution: int = 128,
    wandb_project: str | None = None,
) -> dict[str, Any]:
    """Fit a 2-D flow to ``exp(-U)`` of a built-in energy by reverse KL; report the KL in nats.

    The KL uses the target's log-normaliser from numerical integration (``glowlab.targets``), so it
    is the true ``KL(q || p)``, zero for a perfect fit. Writes ``metrics.json``, the model as an
    exported folder ``model/`` (:func:`glowlab.load` reads it) and ``target.png`` (target density |
    model density | model samples) to ``out``.
    """
    if target not in ENERGIES:
        raise ValueError(f"--target {target!r} is not one of {', '.join(ENERGIES)}")
    out = Path(out)
    torch.manual_seed(seed)
    config = {
        "target": target,
        "family": family,
        "layers": layers,
        "hidden_features": hidden_features,
        "hidden_layers": hidden_layers,
        "options": options or {},
    }
    model = FlowModel.from_config(
        VectorFlowConfig(
            features=2,
            family=family,
            layers=layers,
            hidden_features=hidden_features,
            hidden_layers=hidden_layers,
            options=options,
        )
    )
    start = time.perf_counter()
    losses = reverse_kl_train(
        model,
        lambda x, beta: -beta * energy(target, x),
        steps,
        batch_size,
        lr,
        seed,
        anneal_steps=anneal_steps,
        log_every=max(1, steps // 10),
    )
    seconds = time.perf_counter() - start
    log_z = log_normaliser(target)
    kl, stderr = kl_estimate(model, lambda x: -energy(target, x) - log_z, kl_samples)
    bound = energy_window(target)
    points, _ = grid_points(bound, resolution)
    target_logp = (-energy(target, torch.as_tensor(points)) - log_z).double().numpy().reshape(resolution, resolution)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        drawn = model.sample(5000, generator=torch.Generator().manual_seed(seed)).double().numpy()
    panels = [
        Heatmap(np.exp(target_logp), bound, f"target {target}"),
        Heatmap(np.exp(_grid_log_density(model, bound, resolution)), bound, f"flow density ({family})"),
        Scatter(drawn, bound, "flow samples"),
    ]
    panel = save_panels(panels, out / "target.png", title=f"KL(q ‖ p) = {kl:.3f} ± {stderr:.3f} nats")
    metrics = {
        **config,
        "kl": kl,
        "kl_stderr": stderr,
        "log_normaliser": log_z,
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "final_loss": losses[-1] if losses else None,
    }
    write_json(out / "metrics.json", metrics)
    save_model(model, out / "model", {"kl": kl, "kl_stderr": stderr}, {"target": target}, source="glowlab fit-target")
    print(f"{target}: KL(q || p) = {kl:.4f} ± {stderr:.4f} nats ({family}, {steps} steps) -> {out}")
    log_to_wandb(wandb_project, "fit-target", config, {"target": panel}, {"kl": kl})
    return metrics


STUDENTS = {"maf": "iaf", "maf-spline": "iaf-spline"}


def _sampling_seconds(model: FlowModel, n: int, repeats: int = 5) -> float:
    times = []
    for r in range(repeats):
        generator = torch.Generator().manual_seed(r)
        start = time.perf_counter()
        model.sample(n, generator=generator)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _distill_panels(
    teacher: FlowModel, student: FlowModel, teacher_samples: Tensor, losses: list[float], seed: int, resolution: int
) -> list[Panel]:
    """Teacher and student log-densities (one colour scale), student samples and the training KL, for 2-D models.

    Models of more dimensions get the training curve alone. The window holds all but the teacher's
    farthest 0.1% of coordinates.
    """
    steps = np.arange(len(losses))
    curve = Curve(
        steps,
        np.asarray(losses),
        "training",
        ylabel="KL(student ‖ teacher) per batch, nats",
        smooth=max(1, len(losses) // 50),
    )
    if teacher.features != 2:
        return [curve]
    bound = plot_bound(teacher_samples.double().numpy(), margin=1.2, quantile=0.999)
    teacher_logp = _grid_log_density(teacher, bound, resolution)
    student_logp = _grid_log_density(student, bound, resolution)
    # One colour scale for both, so equal colours mean equal densities.
    top = max(float(f[np.isfinite(f)].max(initial=-math.inf)) for f in (teacher_logp, student_logp))
    with torch.no_grad():
        drawn = student.sample(5000, generator=torch.Generator().manual_seed(seed)).double().numpy()
    scale = {"label": "log density", "vmax": top if math.isfinite(top) else None, "dynamic_range": 10.0}
    return [
        Heatmap(teacher_logp, bound, f"teacher ({teacher.config.family}) log density", **scale),
        Heatmap(student_logp, bound, f"student ({student.config.family}) log density", **scale),
        Scatter(drawn, bound, "student samples"),
        curve,
    ]


def distill(
    *,
    teacher: str | Path,
    out: str | Path,
    family: str | None = None,
    steps: int = 3000,
    batch_size: int = 512,
    lr: float = 1e-3,
    seed: int = 0,
    kl_samples: int = 20000,
    timing_samples: int = 10000,
    resolution: int = 128,
    wandb_project: str | None = None,
) -> dict[str, Any]:
    """Train an IAF student on a MAF teacher's density by reverse KL, so sampling takes one pass.

    The student has the teacher's architecture (``maf`` -> ``iaf``, ``maf-spline`` -> ``iaf-spline``,
    or ``family``) and standardisation. Reports ``KL(student || teacher)`` and
    ``KL(teacher || student)`` in nats, and the sampling speed-up (median wall time of drawing
    ``timing_samples`` vectors, teacher over student). The student is saved as an exported model
    folder (``student/``), which every job takes in place of a checkpoint. ``distill.png`` shows
    the teacher's and the student's log-densities on one colour scale, student samples and the
    per-batch KL during training (the curve alone for more than two dimensions).

    References: van den Oord et al., "Parallel WaveNet: Fast High-Fidelity Speech Synthesis", ICML 2018.
    """
    teacher_model = load_vector_model(teacher)
    teacher_config = teacher_model.config
    student_family = family or STUDENTS.get(teacher_config.family)
    if student_family is None:
        raise ValueError(f"teacher family {teacher_config.family!r} has no default student: pass --family")
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    model = FlowModel.from_config(dataclasses.replace(teacher_config, family=student_family))
    start = time.perf_counter()
    # The teacher is normalised, so each step's loss is a one-batch estimate of KL(student || teacher).
    losses = reverse_kl_train(
        model, lambda x, beta: teacher_model.log_prob(x), steps, batch_size, lr, seed, log_every=max(1, steps // 10)
    )
    seconds = time.perf_counter() - start
    kl, kl_se = kl_estimate(model, teacher_model.log_prob, kl_samples)
    with torch.no_grad():
        x = teacher_model.sample(kl_samples, generator=torch.Generator().manual_seed(seed + 1))
        forward_kl, forward_se = mean_and_stderr(teacher_model.log_prob(x) - model.log_prob(x))
    teacher_s = _sampling_seconds(teacher_model, timing_samples)
    student_s = _sampling_seconds(model, timing_samples)
    out = Path(out)
    student = out / "student"
    metrics = {
        "teacher": str(teacher),
        "teacher_family": teacher_config.family,
        "student_family": student_family,
        "features": teacher_config.features,
        "kl_student_teacher": kl,
        "kl_student_teacher_stderr": kl_se,
        "kl_teacher_student": forward_kl,
        "kl_teacher_student_stderr": forward_se,
        "teacher_sampling_seconds": teacher_s,
        "student_sampling_seconds": student_s,
        "sampling_speedup": teacher_s / student_s if student_s > 0 else math.inf,
        "timing_samples": timing_samples,
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "student": str(student),
        "plot": str(out / "distill.png"),
    }
    panels = _distill_panels(teacher_model, model, x, losses, seed, resolution)
    title = (
        f"KL(student ‖ teacher) = {kl:.3f} ± {kl_se:.3f} nats, "
        f"KL(teacher ‖ student) = {forward_kl:.3f} ± {forward_se:.3f} nats"
    )
    plot = save_panels(panels, out / "distill.png", title=title)
    save_model(model, student, {"kl_student_teacher": kl}, {"teacher": str(teacher)}, source="glowlab distill")
    write_json(out / "metrics.json", metrics)
    print(
        f"student {student_family}: KL(student || teacher) {kl:.4f} ± {kl_se:.4f}, "
        f"KL(teacher || student) {forward_kl:.4f} ± {forward_se:.4f} nats; sampling "
        f"{metrics['sampling_speedup']:.1f}x faster than the teacher -> {out}"
    )
    wandb_config = {"teacher": str(teacher), "family": student_family}
    log_to_wandb(wandb_project, "distill", wandb_config, {"distill": plot}, metrics)
    return metrics


def _options(text: str | None) -> dict:
    """``--options`` as JSON (``'{"bins": 16}'``); an error names the option on bad input."""

    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exn:
        raise ValueError(f"--options is not valid JSON: {exn}") from exn
    if not isinstance(options, dict):
        raise ValueError("--options must be a JSON object, like '{\"bins\": 16}'")
    return options


def _flow_args(parser: argparse.ArgumentParser, family: str) -> None:
    parser.add_argument("--family", default=family, help="flow family (see docs/density-lab.md)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden-features", type=int, default=64)
    parser.add_argument("--hidden-layers", type=int, default=2)
    parser.add_argument("--options", help="family options as JSON, e.g. '{\"bins\": 16}'")


def _reverse_kl_args(parser: argparse.ArgumentParser, steps: int) -> None:
    """Optimisation options shared by the reverse-KL jobs (fit-target, distill)."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wandb-project")


def _reverse_kl_kwargs(args: argparse.Namespace) -> dict:
    return {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "wandb_project": args.wandb_project,
    }


def fit_target_main(argv: list[str]) -> dict:
    """``glowlab fit-target``: fit a flow to exp(-U) of a built-in 2-D energy by reverse KL."""
    parser = job_parser("glowlab fit-target", fit_target_main.__doc__, small_model=True)
    parser.add_argument("--target", required=True, choices=ENERGIES)
    _flow_args(parser, "realnvp")
    _reverse_kl_args(parser, steps=5000)
    parser.add_argument("--anneal-steps", type=int, default=1000, help="inverse temperature 0.01 -> 1 over these")
    parser.add_argument("--out", help="default: runs/target/TARGET-FAMILY")
    args = parser.parse_args(argv)
    return fit_target(
        target=args.target,
        out=args.out or f"runs/target/{args.target}-{args.family}",
        family=args.family,
        layers=args.layers,
        hidden_features=args.hidden_features,
        hidden_layers=args.hidden_layers,
        options=_options(args.options),
        anneal_steps=args.anneal_steps,
        **_reverse_kl_kwargs(args),
    )


def distill_main(argv: list[str]) -> dict:
    """``glowlab distill``: an IAF student trained on a MAF teacher's density (one-pass sampling)."""
    parser = job_parser("glowlab distill", distill_main.__doc__, small_model=True)
    parser.add_argument("--teacher", required=True, help="density-lab checkpoint (or exported folder) of a MAF")
    parser.add_argument("--family", help="student family (default: iaf for maf, iaf-spline for maf-spline)")
    _reverse_kl_args(parser, steps=3000)
    parser.add_argument("--out", default="runs/distill")
    args = parser.parse_args(argv)
    return distill(teacher=args.teacher, out=args.out, family=args.family, **_reverse_kl_kwargs(args))
