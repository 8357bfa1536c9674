"""Density lab inputs: toy 2-D data sets, tabular vector files, target energies, PNG plots."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from PIL import Image

from glowlab.data import TOY_DATASETS, DataError, load_vectors, make_toy, split_vectors, standardise, toy_splits
from glowlab.plots import (
    DPI,
    PANEL_SIZE,
    Curve,
    Heatmap,
    Scatter,
    grid_points,
    panels_figure,
    save_figure,
    save_heatmap,
    save_panels,
    save_scatter,
)
from glowlab.targets import ENERGIES, INTEGRATION_BOUND, energy, energy_window, log_normaliser, log_prob

N = 2000


# Toy data sets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_shape_seed_and_range(name: str) -> None:
    x = make_toy(name, N, seed=0)
    assert x.shape == (N, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    assert np.array_equal(x, make_toy(name, N, seed=0))
    assert np.abs(x - make_toy(name, N, seed=1)).mean() > 0.1
    assert np.abs(x).max() <= 4.5
    # One plotting window for all sets: the data fill a good part of [-4, 4]^2, not a corner of it.
    assert np.abs(x).max() > 2.5 and np.abs(x.mean(axis=0)).max() < 0.3


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_splits_are_disjoint_independent_draws(name: str) -> None:
    splits = toy_splits(name, 300, 100, 50, seed=3)
    assert {k: v.shape for k, v in splits.items()} == {"train": (300, 2), "val": (100, 2), "test": (50, 2)}
    rows = np.concatenate(list(splits.values()))
    assert len(np.unique(rows, axis=0)) == len(rows)
    again = toy_splits(name, 300, 40, 50, seed=3)
    assert np.array_equal(again["train"], splits["train"]) and np.array_equal(again["test"], splits["test"])
    assert not np.array_equal(toy_splits(name, 300, 100, 50, seed=4)["train"], splits["train"])


def test_toy_rejects_unknown_name_and_bad_size() -> None:
    with pytest.raises(ValueError, match=r"'swiss'.*moons, circles, checkerboard, 8gaussians, pinwheel, spirals"):
        make_toy("swiss", 10)
    with pytest.raises(ValueError, match=r"non-negative integer"):
        make_toy("moons", -1)
    assert make_toy("moons", 0).shape == (0, 2)


def distance_to_curve(x: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """Distance from each point of x (N, 2) to the nearest point of a densely sampled curve (M, 2)."""
    return np.sqrt(((x[:, None, :] - curve[None, :, :]) ** 2).sum(-1)).min(axis=1)  # (N,)


def test_moons_lie_on_two_interleaved_half_circles() -> None:
    x = make_toy("moons", N).astype(np.float64)
    t = np.linspace(0.0, np.pi, 400)
    upper = np.stack([-1 + 2 * np.cos(t), -0.5 + 2 * np.sin(t)], axis=1)  # (400, 2)
    lower = np.stack([1 - 2 * np.cos(t), 0.5 - 2 * np.sin(t)], axis=1)  # (400, 2)
    d_upper, d_lower = distance_to_curve(x, upper), distance_to_curve(x, lower)
    assert np.minimum(d_upper, d_lower).max() < 0.8  # noise std 0.16
    on_upper = d_upper < d_lower
    assert 0.45 < on_upper.mean() < 0.55
    # Interleaved: the upper moon's right tip dips below the lower moon's left tip's height.
    assert x[on_upper, 1].mean() > 0.3 > -0.3 > x[~on_upper, 1].mean()


def test_circles_have_two_radii() -> None:
    x = make_toy("circles", N).astype(np.float64)
    radius = np.hypot(x[:, 0], x[:, 1])
    outer, inner = np.abs(radius - 3.0) < 0.5, np.abs(radius - 1.5) < 0.5
    assert (outer | inner).all() and 0.45 < outer.mean() < 0.55
    angle = np.arctan2(x[:, 1], x[:, 0])
    assert abs(np.cos(angle).mean()) < 0.1 and abs(np.sin(angle).mean()) < 0.1


def test_checkerboard_fills_only_and_all_black_squares() -> None:
    x = make_toy("checkerboard", N).astype(np.float64)
    assert np.abs(x).max() <= 4.0
    cell = np.floor((x + 4.0) / 2.0).astype(int)  # (N, 2) column, row from the bottom-left
    assert ((cell.sum(axis=1) % 2) == 0).all()
    counts = np.bincount(cell[:, 0] * 4 + cell[:, 1], minlength=16)
    black = [c * 4 + r for c in range(4) for r in range(4) if (c + r) % 2 == 0]
    assert np.all(np.abs(counts[black] / (N / 8) - 1) < 0.25)


def test_8gaussians_form_eight_equal_clusters_on_a_circle() -> None:
    x = make_toy("8gaussians", N).astype(np.float64)
    angles = np.arange(8) * np.pi / 4
    centres = 3.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (8, 2)
    dist = np.sqrt(((x[:, None] - centres[None]) ** 2).sum(-1))  # (N, 8)
    nearest = dist.argmin(axis=1)
    assert dist.min(axis=1).max() < 1.25  # std 0.25
    assert np.all(np.abs(np.bincount(nearest, minlength=8) / (N / 8) - 1) < 0.25)
    for k in range(8):
        assert np.abs(x[nearest == k].mean(axis=0) - centres[k]).max() < 0.1


def test_pinwheel_has_five_swirling_arms() -> None:
    x = make_toy("pinwheel", N).astype(np.float64)
    radius, angle = np.hypot(x[:, 0], x[:, 1]), np.arctan2(x[:, 1], x[:, 0])
    # Undo the swirl (angle grows with 0.25 exp(r), r = radius / 1.9); the arms then point at 2 pi k / 5.
    unswirled = (angle - 0.25 * np.exp(radius / 1.9)) % (2 * np.pi)
    arm_width = 2 * np.pi / 5
    offset = (unswirled + arm_width / 2) % arm_width - arm_width / 2
    assert np.quantile(np.abs(offset), 0.95) < 0.15  # a uniform cloud gives ~0.6
    arm = np.round(unswirled / arm_width).astype(int) % 5
    assert np.all(np.abs(np.bincount(arm, minlength=5) / (N / 5) - 1) < 0.2)


def test_spirals_are_two_archimedean_arms_half_a_turn_apart() -> None:
    x = make_toy("spirals", N).astype(np.float64)
    radius, angle = np.hypot(x[:, 0], x[:, 1]), np.arctan2(x[:, 1], x[:, 0])
    outside = radius > 1.0  # near the centre the noise swamps the angle
    # On the spirals the angle is 3 pi * radius / 3.5, plus pi on the second arm.
    phase = (angle - 3 * np.pi * radius / 3.5)[outside] % (2 * np.pi)
    off_arm = (phase + np.pi / 2) % np.pi - np.pi / 2
    assert np.quantile(np.abs(off_arm), 0.9) < 0.55  # a uniform cloud gives ~1.4
    second = np.abs(phase - np.pi) < np.pi / 2
    assert 0.45 < second.mean() < 0.55


# Tabular vectors ----------------------------------------------------------------------------------


def test_npz_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    train, val, test = rng.normal(size=(7, 3)), rng.normal(size=(4, 3)), rng.normal(size=(2, 3))
    monkeypatch.chdir(tmp_path)  # relative str paths work too
    np.savez("splits.npz", train=train, val=val, test=test, labels=np.arange(7))
    got = load_vectors("splits.npz")
    assert list(got) == ["train", "val", "test"]
    for name, want in {"train": train, "val": val, "test": test}.items():
        assert got[name].dtype == np.float32 and np.allclose(got[name], want, atol=1e-6)
    np.savez("partial.npz", train=train, test=test)
    assert set(load_vectors(Path("partial.npz"))) == {"train", "test"}
    np.savez("x.npz", x=train, y=np.arange(7))
    np.savez("only.npz", data=np.arange(6).reshape(3, 2))
    assert np.allclose(load_vectors("x.npz")["all"], train, atol=1e-6)
    assert np.array_equal(load_vectors("only.npz")["all"], np.arange(6, dtype=np.float32).reshape(3, 2))


def test_csv_round_trips(tmp_path: Path) -> None:
    rows = np.array([[0.5, -1.0, 2.0], [3.25, 1e-3, -7.0]])
    plain, header, txt = tmp_path / "plain.csv", tmp_path / "header.csv", tmp_path / "values.txt"
    plain.write_text("0.5,-1,2\n3.25, 1e-3 ,-7\n")
    header.write_text('\ufeffa, "b",c\n\n0.5,-1,2\n\n3.25,0.001,-7.0\n')
    txt.write_text("0.5,-1,2\r\n3.25,0.001,-7\r\n")
    for path in (plain, header, txt):
        got = load_vectors(path)
        assert list(got) == ["all"] and got["all"].dtype == np.float32 and np.allclose(got["all"], rows)
    column = tmp_path / "column.csv"
    column.write_text("value\n1\n2\n3\n")
    assert load_vectors(column)["all"].shape == (3, 1)


def _text(content: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(content)


def _npz(**arrays: np.ndarray) -> Callable[[Path], None]:
    return lambda path: np.savez(path, **arrays)


def _object_npz(path: Path) -> None:
    with open(path, "wb") as f:
        np.savez(f, x=np.array([[1.0, "a"]], dtype=object))


def _not_a_zip(path: Path) -> None:
    path.write_bytes(b"this is not a zip archive")


BAD_FILES = [
    ("unknown.json", _text("[1, 2]"), DataError, r"unknown extension '\.json'.*\.npz, \.csv, \.txt"),
    ("word.csv", _text("1,2\n3,abc\n"), DataError, r"line 2, column 2: 'abc' is not a number"),
    ("empty_field.csv", _text("x,y\n1,2\n3,\n"), DataError, r"line 3, column 2: '' is not a number"),
    ("mixed_header.csv", _text("x,1\n1,2\n"), DataError, r"line 1, column 1: 'x' is not a number"),
    ("ragged.csv", _text("1,2\n\n3,4\n5,6,7\n"), DataError, r"line 4 has 3 values, earlier lines have 2"),
    ("nan.csv", _text("1,2\nnan,4\n"), DataError, r"line 2 has a NaN or inf value"),
    ("huge.txt", _text("1,2\n3,4\n1e39,0\n"), DataError, r"line 3 has a NaN or inf value"),
    ("header_only.csv", _text("a,b\n\n"), DataError, r"no data rows"),
    ("blank.csv", _text(""), DataError, r"no data rows"),
    ("flat.npz", _npz(x=np.ones(5)), DataError, r"array 'x' must be a 2-D \(N, D\) array, got shape \(5,\)"),
    ("cube.npz", _npz(train=np.ones((2, 2, 2))), DataError, r"array 'train' must be a 2-D"),
    ("nan.npz", _npz(train=np.ones((3, 2)), val=np.array([[1.0, np.inf]])), DataError, r"array 'val'.*NaN or inf"),
    ("empty.npz", _npz(train=np.ones((0, 3))), DataError, r"array 'train' is empty"),
    ("dims.npz", _npz(train=np.ones((4, 3)), test=np.ones((4, 2))), DataError, r"differ.*train=3, test=2"),
    ("no_train.npz", _npz(val=np.ones((4, 3))), DataError, r"split array\(s\) val but no 'train'"),
    ("two.npz", _npz(a=np.ones((4, 3)), b=np.ones((4, 3))), DataError, r"found: a, b"),
    ("strings.npz", _npz(x=np.array([["1", "2"]])), DataError, r"array 'x' must hold real numbers"),
    ("objects.npz", _object_npz, DataError, r"array 'x' could not be read"),
    ("broken.npz", _not_a_zip, DataError, r"not a readable \.npz"),
]


@pytest.mark.parametrize(("name", "write", "error", "message"), BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_vector_files_name_the_file_and_stay_unchanged(
    tmp_path: Path, name: str, write: Callable[[Path], None], error: type[Exception], message: str
) -> None:
    path = tmp_path / name
    write(path)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    with pytest.raises(error, match=re.escape(str(path)) + r": .*" + message):
        load_vectors(path)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.npz"))):
        load_vectors(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_vectors(tmp_path)
    assert issubclass(DataError, ValueError)


def test_split_vectors_partitions_deterministically() -> None:
    x = np.arange(300, dtype=np.float32).reshape(100, 3)
    splits = split_vectors(x, seed=5)
    assert {k: len(v) for k, v in splits.items()} == {"train": 80, "val": 10, "test": 10}
    assert np.array_equal(np.sort(np.concatenate(list(splits.values())), axis=0), x)
    assert all(np.array_equal(splits[k], v) for k, v in split_vectors(x, seed=5).items())
    assert not np.array_equal(split_vectors(x, seed=6)["train"], splits["train"])
    assert set(split_vectors(x, fractions=(0.9, 0.1, 0.0))) == {"train", "val"}
    for fractions in [(0.5, 0.5), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1)]:
        with pytest.raises(ValueError, match=r"fractions"):
            split_vectors(x, fractions=fractions)
    with pytest.raises(ValueError, match=r"no training rows"):
        split_vectors(x[:2], fractions=(0.0, 0.5, 0.5))


def test_standardise_uses_train_statistics_only() -> None:
    rng = np.random.default_rng(1)
    splits = {"train": rng.normal(3.0, 2.0, (50, 3)), "test": rng.normal(-5.0, 9.0, (20, 3))}
    splits["train"][:, 2] = 7.0
    scaled, mean, std = standardise(splits)
    assert mean.shape == std.shape == (3,) and scaled["test"].dtype == np.float32
    assert np.allclose(scaled["train"][:, :2].mean(axis=0), 0.0, atol=1e-5)
    assert np.allclose(scaled["train"][:, :2].std(axis=0), 1.0, atol=1e-5)
    assert np.allclose(scaled["test"][:, :2], (splits["test"][:, :2] - mean[:2]) / std[:2], atol=1e-4)
    assert std[2] == np.float32(1e-6) and np.array_equal(scaled["train"][:, 2], np.zeros(50, dtype=np.float32))
    assert np.isfinite(scaled["test"]).all()
    with pytest.raises(ValueError, match=r"'train' split.*all"):
        standardise({"all": splits["train"]})


# Target energies ----------------------------------------------------------------------------------


def gauss(x: float, centre: float, std: float) -> float:
    return math.exp(-0.5 * ((x - centre) / std) ** 2)


def paper_energy(name: str, z1: float, z2: float) -> float:
    """The paper's U1-U4 written out with math, plus this module's z1 envelope on U2-U4."""
    w1 = math.sin(2 * math.pi * z1 / 4)
    w2 = 3 * gauss(z1, 1.0, 0.6)
    w3 = 3 / (1 + math.exp(-(z1 - 1) / 0.3))
    envelope = 0.5 * (z1 / 3.0) ** 4
    if name == "u1":
        return 0.5 * ((math.hypot(z1, z2) - 2) / 0.4) ** 2 - math.log(gauss(z1, 2, 0.6) + gauss(z1, -2, 0.6))
    if name == "u2":
        return 0.5 * ((z2 - w1) / 0.4) ** 2 + envelope
    if name == "u3":
        return -math.log(gauss(z2 - w1, 0, 0.35) + gauss(z2 - w1 + w2, 0, 0.35)) + envelope
    return -math.log(gauss(z2 - w1, 0, 0.4) + gauss(z2 - w1 + w3, 0, 0.35)) + envelope


def test_u1_by_hand() -> None:
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    # At the origin: 0.5 (2 / 0.4)^2 = 12.5, and both modes give exp(-0.5 (2 / 0.6)^2) = exp(-50 / 9).
    want = [12.5 + 50 / 9 - math.log(2), -math.log(1 + math.exp(-0.5 * (4 / 0.6) ** 2))]
    assert torch.allclose(energy("u1", z), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ENERGIES)
def test_energies_match_the_formulas(name: str) -> None:
    points = [(0.3, -0.7), (1.0, -2.0), (2.5, 1.1), (-3.2, 0.4), (3.0, -4.0)]
    got = energy(name, torch.tensor(points, dtype=torch.float64))
    assert got.shape == (len(points),) and got.dtype == torch.float64
    want = torch.tensor([paper_energy(name, *p) for p in points], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)
    assert energy(name, torch.tensor(points)).dtype == torch.float32


@pytest.mark.parametrize("name", ENERGIES)
def test_energies_are_integrable_and_smooth(name: str) -> None:
    far = torch.tensor([[10.0, 0.0], [-10.0, 1.0], [0.5, 10.0], [0.5, -10.0]], dtype=torch.float64)
    assert (energy(name, far) > 25.0).all()
    z = torch.tensor([[0.0, 0.0], [1.0, -2.0], [-3.9, 3.9]], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(energy(name, z).sum(), z)
    assert torch.isfinite(grad).all()
    assert energy_window(name) == 4.0


@pytest.mark.parametrize("name", ENERGIES)
def test_log_normaliser_converges_and_normalises(name: str) -> None:
    coarse, fine = log_normaliser(name, resolution=150), log_normaliser(name, resolution=300)
    assert abs(math.exp(coarse - fine) - 1) < 1e-3
    bound = INTEGRATION_BOUND[name]
    points, area = grid_points(bound, 250)
    mass = log_prob(name, torch.from_numpy(points)).exp().sum().item() * area
    assert abs(mass - 1) < 1e-6


def test_target_mass_in_the_plotting_window() -> None:
    def window_mass(name: str) -> float:
        return math.exp(log_normaliser(name, bound=4.0, resolution=200) - log_normaliser(name))

    assert window_mass("u1") > 0.9999
    assert 0.96 < window_mass("u2") < 0.98  # the z1 envelope's documented ~3 % outside
    assert window_mass("u4") < window_mass("u3")  # U4's lower branch runs out below z2 = -4


def test_energy_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"'u5'.*u1, u2, u3, u4"):
        energy("u5", torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"'ring'"):
        log_normaliser("ring")
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        energy("u1", torch.zeros(3, 3))


# Plots --------------------------------------------------------------------------------------------


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).astype(np.float64)  # (H, W, 3)


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.2126, 0.7152, 0.0722])


def figure_pixels(panels: int, title: bool = False) -> tuple[int, int]:
    """(height, width) in pixels of a figure of ``panels`` side by side."""
    return round((PANEL_SIZE[1] + (0.3 if title else 0.0)) * DPI), round(PANEL_SIZE[0] * panels * DPI)


def axes_pixels(image: np.ndarray, ax: Axes, inset: int = 0) -> np.ndarray:
    """The part of a saved figure's pixels inside ``ax`` (its frame cut off by ``inset`` pixels)."""
    box = ax.get_window_extent()  # display pixels, y up from the bottom of the figure
    top, bottom = image.shape[0] - round(box.y1), image.shape[0] - round(box.y0)
    return image[top + inset : bottom - inset, round(box.x0) + inset : round(box.x1) - inset]


def test_grid_points_are_cell_centres_in_image_order() -> None:
    points, area = grid_points(2.0, 4)
    assert points.shape == (16, 2) and area == 1.0
    assert points[0].tolist() == [-1.5, 1.5] and points[3].tolist() == [1.5, 1.5] and points[-1].tolist() == [1.5, -1.5]


@pytest.mark.parametrize("centre", [(2.5, 1.5), (-2.0, -3.0), (-1.0, 2.5)])
def test_heatmap_shows_a_density_where_its_point_is(tmp_path: Path, centre: tuple[float, float]) -> None:
    bound, resolution = 4.0, 64
    points, _ = grid_points(bound, resolution)
    bump = np.exp(-((points - np.array(centre)) ** 2).sum(axis=1) / 0.3)  # in grid_points' order
    fig = panels_figure([Heatmap(bump.reshape(resolution, resolution), bound, "bump")])
    image = read_png(save_figure(fig, tmp_path / "sub" / "bump.png"))
    assert image.shape[:2] == figure_pixels(1)
    heatmap, colour_bar = fig.axes
    assert heatmap.get_xlim() == (-bound, bound) and heatmap.get_ylim() == (-bound, bound)
    assert colour_bar.get_ylabel() == "density"
    inside = luminance(axes_pixels(image, heatmap))  # viridis: the largest value is the brightest
    row, column = np.unravel_index(np.argmax(inside), inside.shape)
    x = -bound + 2 * bound * (column + 0.5) / inside.shape[1]
    y = bound - 2 * bound * (row + 0.5) / inside.shape[0]
    assert abs(x - centre[0]) < 0.3 and abs(y - centre[1]) < 0.3, (x, y)
    assert not list(tmp_path.rglob("*.partial"))


def test_heatmap_non_finite_values_and_range(tmp_path: Path) -> None:
    field = np.zeros((4, 4))
    field[0, 0], field[0, 3], field[3, 3] = np.nan, -np.inf, 1.0
    fig = panels_figure([Heatmap(field, 2.0, "holes")])
    image = axes_pixels(read_png(save_figure(fig, tmp_path / "nan.png")), fig.axes[0], inset=2)
    h, w = image.shape[:2]
    centre = {
        cell: image[round((r + 0.5) * h / 4), round((c + 0.5) * w / 4)]
        for cell, (r, c) in {"nan": (0, 0), "-inf": (0, 3), "zero": (1, 1), "one": (3, 3)}.items()
    }
    assert centre["nan"].tolist() == [211.0, 211.0, 211.0]  # masked: light grey, outside the colour map
    assert np.array_equal(centre["-inf"], centre["zero"])  # -inf clipped to the lowest colour
    assert luminance(centre["one"]) > luminance(centre["zero"]) + 100
    assert read_png(save_heatmap(np.full((3, 3), np.nan), tmp_path / "all-nan.png", 1.0)).shape[:2] == figure_pixels(1)
    ranged = panels_figure([Heatmap(np.array([[0.0, 5.0, 10.0, np.inf]]), 1.0, label="log density", dynamic_range=5)])
    norm = ranged.axes[0].images[0].norm
    assert (norm.vmin, norm.vmax) == (5.0, 10.0) and ranged.axes[1].get_ylabel() == "log density"
    with pytest.raises(ValueError, match=r"square"):
        save_heatmap(np.zeros(10), tmp_path / "bad.png", 1.0)
    with pytest.raises(ValueError, match=r"bound > 0"):
        save_heatmap(np.zeros((2, 2)), tmp_path / "bad.png", 0.0)


def test_scatter_draws_points_where_they_are(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(3.0, 0.2, (200, 2)), [[9.0, 0.0], [np.nan, 0.0], [0.0, -np.inf]]])
    fig = panels_figure([Scatter(points, 4.0, "samples")])
    image = axes_pixels(read_png(save_figure(fig, tmp_path / "scatter.png")), fig.axes[0], inset=3)
    inked = np.argwhere(luminance(image) < 200)  # (M, 2) row, column of drawn dots
    h, w = image.shape[:2]
    assert len(inked) > 50
    assert np.all(inked[:, 0] < h / 4) and np.all(inked[:, 1] > 3 * w / 4)  # (3, 3) is the top-right eighth
    assert len(fig.axes) == 1 and fig.axes[0].get_xlim() == (-4.0, 4.0)
    assert read_png(save_scatter(points, tmp_path / "s.png", 4.0)).shape[:2] == figure_pixels(1)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        save_scatter(np.zeros((3, 3)), tmp_path / "bad.png", 4.0)


def test_panels_side_by_side_with_titles_and_colour_bars(tmp_path: Path) -> None:
    panels = [
        Heatmap(np.eye(8), 2.0, "density"),
        Scatter(np.zeros((5, 2)), 2.0, "samples"),
        Curve(np.arange(100), np.linspace(1, 0, 100), "training", ylabel="loss", smooth=10),
    ]
    fig = panels_figure(panels, title="run")
    heatmap, scatter, curve, colour_bar = fig.axes
    assert [heatmap.get_title(), scatter.get_title(), curve.get_title()] == ["density", "samples", "training"]
    assert curve.get_xlabel() == "step" and curve.get_ylabel() == "loss" and len(curve.lines) == 2
    assert colour_bar.get_ylabel() == "density"
    assert heatmap.get_window_extent().x1 < scatter.get_window_extent().x0 < curve.get_window_extent().x0
    with Image.open(save_panels(panels, tmp_path / "panels.png", title="run")) as image:
        assert image.format == "PNG" and image.size == figure_pixels(3, title=True)[::-1]
    with pytest.raises(ValueError, match=r"at least one panel"):
        save_panels([], tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"one length"):
        save_panels([Curve(np.arange(3), np.arange(4))], tmp_path / "bad.png")
