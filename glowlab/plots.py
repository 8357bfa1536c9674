"""PNG pictures of 2-D densities and samples, with numpy and Pillow only (no plotting library).

Used alike by the density lab's callback and its jobs (the lab, reverse-KL fits).

Orientation, shared by every function here: an image's row 0 is the top, i.e. the largest y, and
column 0 is the smallest x, so a point (x, y) appears where it would on a paper plot.
``grid_points`` lists its cell centres in exactly that row-major image order, so
``save_heatmap(f(points).reshape(R, R), ...)`` needs no flipping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from glowlab.files import write_atomic
from glowlab.models.density import FlowModel, log_densities

# A dark-to-light colour map of our own: blue-black, violet, magenta, orange, pale yellow. Its
# luminance rises monotonically between and across the anchors (linear interpolation in RGB keeps
# luminance linear in between), so brighter always means larger.
COLOUR_ANCHORS = np.array(
    [[13, 8, 35], [64, 26, 110], [150, 40, 120], [232, 105, 60], [252, 236, 150]], dtype=np.float64
)  # (K, 3)
TITLE_HEIGHT = 20
DEFAULT_SIZE = 256
TEXT_SIZE = 12


def colourise(unit: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped; non-finite -> 0) to uint8 RGB, shape ``unit.shape + (3,)``."""
    unit = np.where(np.isfinite(unit), np.clip(unit, 0.0, 1.0), 0.0)
    position = unit * (len(COLOUR_ANCHORS) - 1)
    lower = np.minimum(np.floor(position).astype(np.int64), len(COLOUR_ANCHORS) - 2)
    frac = (position - lower)[..., None]
    rgb = COLOUR_ANCHORS[lower] * (1.0 - frac) + COLOUR_ANCHORS[lower + 1] * frac
    return np.round(rgb).astype(np.uint8)


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


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=TEXT_SIZE)


def _with_strip(image: Image.Image, texts: Sequence[tuple[int, str]]) -> Image.Image:
    """``image`` below a white strip holding each (x offset, text)."""
    canvas = Image.new("RGB", (image.width, image.height + TITLE_HEIGHT), "white")
    canvas.paste(image, (0, TITLE_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    for x, text in texts:
        draw.text((x + 4, 3), text, fill="black", font=_font())
    return canvas


def _save(image: Image.Image, path: str | Path, title: str | None) -> Path:
    if title:
        image = _with_strip(image, [(0, title)])
    return write_atomic(path, lambda f: image.save(f, format="PNG"))


def save_heatmap(
    values: np.ndarray,
    path: str | Path,
    title: str | None = None,
    scale: int | None = None,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    dynamic_range: float | None = None,
) -> Path:
    """Colour-map a 2-D field to a PNG; returns the path written.

    ``values`` is (H, W) in image order (row 0 at the top = largest y; see ``grid_points``), or a
    flat array of a square field. Colours span [vmin, vmax] (default: the finite minimum and
    maximum); ``dynamic_range`` raises vmin to ``vmax - dynamic_range``, which keeps a log-density's
    far tails from washing out the picture. NaN and -inf get the lowest colour, +inf the highest; a
    constant field is drawn in the middle colour. Each value becomes a ``scale`` x ``scale`` block
    (default: as large as keeps the picture within 256 pixels); a title adds a strip of
    ``TITLE_HEIGHT`` pixels on top.
    """
    field = np.asarray(values, dtype=np.float64)
    if field.ndim == 1:
        side = math.isqrt(field.size)
        if side * side != field.size:
            raise ValueError(f"a flat field must have a square number of values, got {field.size}")
        field = field.reshape(side, side)  # (R, R)
    if field.ndim != 2 or field.size == 0:
        raise ValueError(f"expected a non-empty (H, W) or flat square field, got shape {field.shape}")
    finite = np.isfinite(field)
    low = vmin if vmin is not None else (field[finite].min() if finite.any() else 0.0)
    high = vmax if vmax is not None else (field[finite].max() if finite.any() else 1.0)
    if dynamic_range is not None:
        low = max(low, high - dynamic_range)
    if high > low:
        unit = (field - low) / (high - low)
    else:
        unit = np.where(finite, 0.5, 0.0)
    unit = np.where(field == np.inf, 1.0, np.where(finite, unit, 0.0))
    if scale is None:
        scale = max(1, DEFAULT_SIZE // max(field.shape))
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    image = Image.fromarray(colourise(unit))
    image = image.resize((field.shape[1] * scale, field.shape[0] * scale), Image.Resampling.NEAREST)
    return _save(image, path, title)


def save_scatter(
    points: np.ndarray, path: str | Path, bound: float, size: int = DEFAULT_SIZE, *, title: str | None = None
) -> Path:
    """Samples (N, 2) as a ``size`` x ``size`` PNG histogram of [-bound, bound]^2; returns the path.

    Each pixel is one histogram bin, coloured by log(1 + count) relative to the fullest bin, so
    sparse tails stay visible next to dense modes. Points outside the window or non-finite are left
    out. Orientation as in ``save_heatmap``.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"expected points of shape (N, 2), got {pts.shape}")
    if bound <= 0 or size < 1:
        raise ValueError(f"need bound > 0 and size >= 1, got bound={bound}, size={size}")
    inside = np.isfinite(pts).all(axis=1) & (np.abs(pts) <= bound).all(axis=1)
    cell = np.floor((pts[inside] + bound) / (2.0 * bound) * size).astype(np.int64).clip(0, size - 1)  # (M, 2)
    counts = np.zeros((size, size))
    np.add.at(counts, (size - 1 - cell[:, 1], cell[:, 0]), 1.0)
    peak = counts.max()
    unit = np.log1p(counts) / np.log1p(peak) if peak > 0 else counts
    return _save(Image.fromarray(colourise(unit)), path, title)


def save_panels(
    paths_or_images: Sequence[str | Path | Image.Image],
    path: str | Path,
    labels: Sequence[str] | None = None,
    *,
    gap: int = 4,
) -> Path:
    """Tile pictures left to right into one PNG (e.g. "data | model density | samples").

    Panels are top-aligned on white with ``gap`` pixels between them; ``labels`` (one per panel)
    go in a strip above. Returns the path written.
    """
    if not paths_or_images:
        raise ValueError("save_panels needs at least one picture")
    if labels is not None and len(labels) != len(paths_or_images):
        raise ValueError(f"got {len(labels)} labels for {len(paths_or_images)} pictures")
    panels = []
    for item in paths_or_images:
        if isinstance(item, Image.Image):
            panels.append(item.convert("RGB"))
        else:
            with Image.open(item) as opened:
                panels.append(opened.convert("RGB"))
    width = sum(panel.width for panel in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, max(panel.height for panel in panels)), "white")
    offsets = []
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        offsets.append(x)
        x += panel.width + gap
    if labels is not None:
        canvas = _with_strip(canvas, list(zip(offsets, labels, strict=True)))
    return _save(canvas, path, None)


def plot_bound(points: np.ndarray, margin: float = 1.1) -> float:
    """Half-width of a square window around the origin holding ``points`` (at least 1)."""
    return max(1.0, float(np.abs(points).max()) * margin) if len(points) else 4.0


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [
        save_scatter(data, path.with_name(path.stem + "-data.png"), bound),
        save_heatmap(
            log_density.reshape(resolution, resolution),
            path.with_name(path.stem + "-logp.png"),
            scale=max(1, 256 // resolution),  # the scatter panels' 256 pixels
            dynamic_range=10.0,
        ),
        save_scatter(drawn, path.with_name(path.stem + "-samples.png"), bound),
    ]
    save_panels(parts, path, labels=["data", "log density", "samples"])
    finite = np.isfinite(log_density)
    return {"mass": float(np.exp(log_density[finite]).sum() * cell_area)}
