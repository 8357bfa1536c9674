"""Figures of 2-D densities, samples and training curves, drawn with matplotlib into PNG files.

Used alike by the density lab's callback and its jobs (the lab, reverse-KL fits, distillation).
Every figure is a ``matplotlib.figure.Figure`` on an Agg canvas, never pyplot's global state, so
drawing is safe from any thread and needs no display.

Orientation, shared by every function here: a field's row 0 is the top, i.e. the largest y, and
column 0 is the smallest x, so a point (x, y) appears where it would on a paper plot.
``grid_points`` lists its cell centres in exactly that row-major image order, so
``save_heatmap(f(points).reshape(R, R), path, bound)`` needs no flipping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from glowlab.files import write_atomic
from glowlab.models.density import FlowModel, log_densities

DPI = 110
PANEL_SIZE = (3.9, 3.4)  # inches per panel (width, height): room for a square plot and its colour bar
# Perceptually uniform and brighter for larger values; NaN cells are shown in light grey.
COLOUR_MAP = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")


@dataclass(frozen=True)
class Heatmap:
    """A field over [-bound, bound]^2 in image order (see ``grid_points``), with a colour bar ``label``.

    ``values`` is (H, W) or a flat array of a square field. Colours span [vmin, vmax] (default: the
    finite minimum and maximum); ``dynamic_range`` raises vmin to ``vmax - dynamic_range``, which
    keeps a log-density's far tails from washing out the picture. NaN cells are masked (grey),
    -inf and +inf take the lowest and highest colours.
    """

    values: np.ndarray
    bound: float
    title: str = ""
    label: str = "density"
    vmin: float | None = None
    vmax: float | None = None
    dynamic_range: float | None = None


@dataclass(frozen=True)
class Scatter:
    """Points (N, 2) in the window [-bound, bound]^2; points outside it or non-finite are not drawn."""

    points: np.ndarray
    bound: float
    title: str = ""


@dataclass(frozen=True)
class Curve:
    """``y`` against ``x`` with labelled axes; ``smooth`` > 1 overlays a moving average of that many points."""

    x: np.ndarray
    y: np.ndarray
    title: str = ""
    xlabel: str = "step"
    ylabel: str = ""
    smooth: int = 1


Panel = Heatmap | Scatter | Curve


def grid_points(bound: float, resolution: int) -> tuple[np.ndarray, float]:
    """Cell centres of a ``resolution`` x ``resolution`` grid on [-bound, bound]^2, and the cell area.

    Points are float64, shape (R * R, 2), in image order: row 0 (the first R points) is the top row
    (largest y), x increasing along each row.
    """
    if bound <= 0 or resolution < 1:
        raise ValueError(f"need bound > 0 and resolution >= 1, got bound={bound}, resolution={resolution}")
    step = 2.0 * bound / resolution
    centres = -bound + step * (np.arange(resolution) + 0.5)
    xs, ys = np.meshgrid(centres, centres[::-1])  # (R, R) each; ys falls down the rows
    return np.stack([xs.ravel(), ys.ravel()], axis=1), step * step  # (R * R, 2)


def _field(values: np.ndarray) -> np.ndarray:
    """``values`` as a float64 (H, W) field; a flat array must hold a square number of values."""
    field = np.asarray(values, dtype=np.float64)
    if field.ndim == 1:
        side = math.isqrt(field.size)
        if side * side != field.size:
            raise ValueError(f"a flat field must have a square number of values, got {field.size}")
        field = field.reshape(side, side)  # (R, R)
    if field.ndim != 2 or field.size == 0:
        raise ValueError(f"expected a non-empty (H, W) or flat square field, got shape {field.shape}")
    return field


def _check_bound(bound: float) -> None:
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"need a finite bound > 0, got {bound}")


def _window(ax: Axes, bound: float, title: str) -> None:
    ax.set_xlim(-bound, bound)
    ax.set_ylim(-bound, bound)
    ax.set_aspect("equal")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title)


def _draw_heatmap(fig: Figure, ax: Axes, panel: Heatmap) -> None:
    _check_bound(panel.bound)
    field = _field(panel.values)
    finite = np.isfinite(field)
    low = panel.vmin if panel.vmin is not None else (field[finite].min() if finite.any() else 0.0)
    high = panel.vmax if panel.vmax is not None else (field[finite].max() if finite.any() else 1.0)
    if panel.dynamic_range is not None:
        low = max(low, high - panel.dynamic_range)
    if not high > low:  # a constant field: centre it in the colour range rather than divide by zero
        low, high = low - 0.5, high + 0.5
    # -inf is a density of zero, the lowest colour; only NaN (no value at all) is masked.
    field = np.where(np.isneginf(field), low, np.where(np.isposinf(field), high, field))
    below = bool((field[finite] < low).any())
    above = bool((field[finite] > high).any())
    b = panel.bound
    image = ax.imshow(
        np.ma.masked_invalid(field),
        extent=(-b, b, -b, b),
        origin="upper",  # row 0 = largest y, as grid_points orders them
        cmap=COLOUR_MAP,
        vmin=low,
        vmax=high,
        interpolation="nearest",
    )
    _window(ax, b, panel.title)
    # The colour bar's pointed ends say that values beyond them were clipped to its end colours.
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}
    fig.colorbar(image, ax=ax, label=panel.label, shrink=0.9, extend=extend[below, above])


def _draw_scatter(ax: Axes, panel: Scatter) -> None:
    _check_bound(panel.bound)
    pts = np.asarray(panel.points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"expected points of shape (N, 2), got {pts.shape}")
    pts = pts[np.isfinite(pts).all(axis=1)]
    # Small translucent dots: dense modes darken, sparse tails stay visible as single dots.
    alpha = float(np.clip(1000.0 / max(len(pts), 1), 0.25, 0.8))
    ax.scatter(pts[:, 0], pts[:, 1], s=2.0, c="tab:blue", alpha=alpha, linewidths=0)
    _window(ax, panel.bound, panel.title)


def _draw_curve(ax: Axes, panel: Curve) -> None:
    x = np.asarray(panel.x, dtype=np.float64)
    y = np.asarray(panel.y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"a curve needs 1-D x and y of one length, got {x.shape} and {y.shape}")
    if panel.smooth > 1 and len(y) >= panel.smooth:
        ax.plot(x, y, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
        kernel = np.ones(panel.smooth) / panel.smooth
        mean = np.convolve(y, kernel, mode="valid")
        ax.plot(x[panel.smooth - 1 :], mean, color="tab:blue", label="moving mean")
        ax.legend(fontsize="small")
        # A few wild early steps would otherwise flatten the rest of the curve against the x-axis.
        raw, smoothed = y[np.isfinite(y)], mean[np.isfinite(mean)]
        if len(raw) >= 100 and len(smoothed):
            low = min(np.percentile(raw, 1.0), smoothed.min())
            high = max(np.percentile(raw, 99.0), smoothed.max())
            pad = 0.05 * (high - low) if high > low else 1.0
            ax.set_ylim(low - pad, high + pad)
    else:
        ax.plot(x, y, color="tab:blue", marker="." if len(y) < 50 else None)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title)
    ax.grid(alpha=0.3)
    ax.set_box_aspect(1.0)  # as tall as the square density panels beside it


def panels_figure(panels: Sequence[Panel], title: str | None = None) -> Figure:
    """One figure with ``panels`` side by side (heatmaps with their colour bars), on an Agg canvas."""
    if not panels:
        raise ValueError("a figure needs at least one panel")
    fig = Figure(figsize=(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1] + (0.3 if title else 0.0)), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.set_layout_engine("constrained", h_pad=0.08)  # a little air between a figure title and the panels'
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        if isinstance(panel, Heatmap):
            _draw_heatmap(fig, ax, panel)
        elif isinstance(panel, Scatter):
            _draw_scatter(ax, panel)
        elif isinstance(panel, Curve):
            _draw_curve(ax, panel)
        else:
            raise TypeError(f"not a panel: {type(panel).__name__}")
    if title:
        fig.suptitle(title)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write ``fig`` as a PNG, atomically; returns the path. The caller still owns the figure."""
    return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def save_panels(panels: Sequence[Panel], path: str | Path, *, title: str | None = None) -> Path:
    """Draw ``panels`` side by side (e.g. "data | model density | samples") into one PNG; returns the path."""
    fig = panels_figure(panels, title)
    try:
        return save_figure(fig, path)
    finally:
        fig.clear()  # breaks the figure's reference cycles so its memory goes now, not at the next GC


def save_heatmap(
    values: np.ndarray,
    path: str | Path,
    bound: float,
    *,
    title: str = "",
    label: str = "density",
    vmin: float | None = None,
    vmax: float | None = None,
    dynamic_range: float | None = None,
) -> Path:
    """A field over [-bound, bound]^2 as a PNG with axes and a colour bar; see ``Heatmap``."""
    return save_panels([Heatmap(values, bound, title, label, vmin, vmax, dynamic_range)], path)


def save_scatter(points: np.ndarray, path: str | Path, bound: float, *, title: str = "") -> Path:
    """Samples (N, 2) as a PNG scatter over [-bound, bound]^2; see ``Scatter``."""
    return save_panels([Scatter(points, bound, title)], path)


def plot_bound(points: np.ndarray, margin: float = 1.1, quantile: float = 1.0) -> float:
    """Half-width of a square window around the origin holding ``points`` (at least 1).

    ``quantile`` < 1 sizes the window by that quantile of the coordinates' magnitudes instead of
    the largest, so a few far samples of a heavy-tailed model do not shrink the picture to a dot.
    """
    if not len(points):
        return 4.0
    return max(1.0, float(np.quantile(np.abs(points), quantile)) * margin)


@torch.no_grad()
def density_panel(
    model: FlowModel,
    data: np.ndarray,
    path: str | Path,
    bound: float,
    resolution: int = 128,
    samples: int = 5000,
    seed: int = 0,
    chunk: int = 4096,
) -> dict[str, float]:
    """Save "data | model log-density | model samples" for a 2-D model and return the grid mass.

    The returned ``mass`` is the model density summed over the plotted window, a quick check that
    the model is normalised (close to 1 when the window holds the data).
    """
    if model.features != 2:
        raise ValueError(f"density plots need 2-D data, got D={model.features}")
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    points, cell_area = grid_points(bound, resolution)
    grid = torch.as_tensor(points, dtype=p.dtype, device=p.device)
    log_density = log_densities(model, grid, chunk).double().cpu().numpy()
    generator = torch.Generator(device=p.device).manual_seed(seed)
    drawn = model.sample(samples, generator=generator).double().cpu().numpy()
    model.train(was_training)
    finite = np.isfinite(log_density)
    mass = float(np.exp(log_density[finite]).sum() * cell_area)
    field = log_density.reshape(resolution, resolution)
    panels = [
        Scatter(data, bound, "data"),
        Heatmap(field, bound, "model log density", label="log density", dynamic_range=10.0),
        Scatter(drawn, bound, "model samples"),
    ]
    save_panels(panels, path, title=f"density mass inside the window: {mass:.3f}")
    return {"mass": mass}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.set_layout_engine("constrained")
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    try:
        return save_figure(fig, path)
    finally:
        fig.clear()


def _unit_of(name: str | None) -> str:
    return "nats" if name and "nll" in name else "bits/dim"


def save_curves(curves: dict, path: str | Path, note: str | None = None) -> Path:
    """A run's training curves: train (per logged step, with a moving mean) and validation values,
    against optimizer steps (left) and wall-clock minutes (right, when the run logged ``time_s``).

    ``curves`` is what :func:`glowlab.jobs.report.read_curves` returns; ``note`` (e.g. the test
    result) goes in the title.
    """
    train, val = curves["train"], curves["val"]
    timed = train["seconds"] is not None
    fig = _figure(PANEL_SIZE[0] * (2.6 if timed else 1.4), PANEL_SIZE[1] + 0.3)
    axes = fig.subplots(1, 2 if timed else 1, squeeze=False)[0]
    for ax, axis in zip(axes, ("steps", "seconds"), strict=False):
        for series, style in ((train, {"alpha": 0.35, "linewidth": 0.8}), (val, {"marker": "o", "markersize": 3})):
            if not len(series["values"]):
                continue
            x = series["steps"] if axis == "steps" else series["seconds"] / 60.0
            ax.plot(x, series["values"], label=series["name"], **style)
            window = max(1, len(series["values"]) // 25)
            if series is train and window > 1:
                kernel = np.ones(window) / window
                ax.plot(x[window - 1 :], np.convolve(series["values"], kernel, mode="valid"), color="tab:blue",
                        label=f"{series['name']} (moving mean of {window})")  # fmt: skip
        values = np.concatenate([s["values"] for s in (train, val) if len(s["values"])])
        if len(values) >= 20:  # a few wild first steps would flatten the rest against the axis
            low, high = np.percentile(values, 0.5), np.percentile(values, 97.0)
            ax.set_ylim(low - 0.05 * (high - low), high + 0.1 * (high - low))
        ax.set_xlabel("optimizer step" if axis == "steps" else "wall-clock minutes")
        ax.set_ylabel(_unit_of(train["name"]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if note:
        fig.suptitle(note)
    return _save(fig, path)


def save_pictures(pictures: Sequence[tuple[str, str | Path]], path: str | Path, columns: int = 4) -> Path:
    """PNG files side by side with a title each (e.g. sample grids over training), ``columns`` per row."""
    from PIL import Image

    if not pictures:
        raise ValueError("no pictures to show")
    columns = min(columns, len(pictures))
    rows = -(-len(pictures) // columns)
    with Image.open(pictures[0][1]) as first:
        aspect = first.height / first.width
    fig = _figure(3.2 * columns, (3.2 * aspect + 0.45) * rows)  # each panel as tall as its picture, plus a title
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax in axes:
        ax.axis("off")
    for ax, (title, picture) in zip(axes, pictures, strict=False):
        with Image.open(picture) as image:
            ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
        ax.set_title(title)
    return _save(fig, path)


def save_level_errors(errors: Sequence[dict], half_bin: float, path: str | Path) -> Path:
    """Encode-decode errors per stage (largest and RMS, log scale) against the half-bin that changes a pixel."""
    fig = _figure(PANEL_SIZE[0] * 1.6, PANEL_SIZE[1])
    ax = fig.subplots()
    names = [e["stage"] for e in errors]
    position = np.arange(len(errors))
    tiny = 1e-12  # an exact round trip (error 0) still gets a visible bar on the log axis
    ax.bar(position - 0.2, [max(e["max_abs"], tiny) for e in errors], 0.4, label="largest error")
    ax.bar(position + 0.2, [max(e["rms"], tiny) for e in errors], 0.4, label="RMS error")
    ax.axhline(half_bin, color="tab:red", linestyle="--", label=f"half a grey level ({half_bin:.2g})")
    ax.set_yscale("log")
    ax.set_xticks(position, names)
    ax.set_ylabel("|decode(encode(x)) - x|")
    changed = max(e["changed"] for e in errors)
    ax.set_title(f"reconstruction; pixels changed: {changed:.2%}" if changed else "reconstruction: no pixel changed")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def save_histograms(values: dict[str, np.ndarray], path: str | Path, xlabel: str, title: str = "") -> Path:
    """Overlaid histograms (densities, shared bins) of named value sets, e.g. nearest-neighbour distances."""
    fig = _figure(PANEL_SIZE[0] * 1.6, PANEL_SIZE[1])
    ax = fig.subplots()
    finite = [v[np.isfinite(v)] for v in values.values()]
    everything = np.concatenate(finite) if finite else np.zeros(1)
    bins = np.linspace(
        everything.min(), everything.max() if everything.max() > everything.min() else everything.min() + 1, 40
    )
    for (name, _), v in zip(values.items(), finite, strict=True):
        ax.hist(v, bins=bins, density=True, alpha=0.5, label=f"{name} (median {np.median(v):.2f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)
