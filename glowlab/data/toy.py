"""Two-dimensional toy data sets for the density lab, generated in code from a seed.

Every set is an i.i.d. draw from a fixed mixture (each point picks its component at random), laid
out on one common scale: the bulk of the data lies in [-4, 4]^2, so a single plotting window
``[-4, 4]^2`` shows every set. The generators use only numpy's ``Generator``, so a seed gives the same
points on every machine and numpy version that keeps ``default_rng``'s streams.

Shapes (all sizes in the final coordinates):

- ``moons``: two interleaved half circles of radius 2, centred at (-1, -0.5) (upper half) and
  (1, 0.5) (lower half), with Gaussian noise of standard deviation 0.16.
- ``circles``: two concentric circles of radius 3 and 1.5, half the points on each, noise 0.1.
- ``checkerboard``: uniform on the 8 "black" cells of a 4 x 4 board of side-2 cells covering
  [-4, 4]^2; the cell in column i, row j (both counted from -4) is black when i + j is even.
- ``8gaussians``: eight equally weighted Gaussians (standard deviation 0.25) centred on the circle of
  radius 3 at angles k * pi / 4.
- ``pinwheel``: five arms; a point has radial coordinate r = 1 + 0.3 e1 and tangential offset
  0.05 e2 (e ~ N(0, 1)), is rotated by 2 pi k / 5 + 0.25 exp(r) and scaled by 1.9, so the
  outer part of each arm swirls further.
- ``spirals``: two interleaved Archimedean spirals (the second is the first rotated by pi) over
  1.5 turns out to radius 3.5, with noise 0.1.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

TOY_DATASETS = ("moons", "circles", "checkerboard", "8gaussians", "pinwheel", "spirals")
SPLIT_NAMES = ("train", "val", "test")

MOONS_RADIUS, MOONS_NOISE = 2.0, 0.16
MOONS_CENTRES = ((-1.0, -0.5), (1.0, 0.5))
CIRCLES_RADII, CIRCLES_NOISE = (3.0, 1.5), 0.1
CHECKER_CELLS, CHECKER_HALF_WIDTH = 4, 4.0
GAUSSIANS_RADIUS, GAUSSIANS_STD, GAUSSIANS_COUNT = 3.0, 0.25, 8
PINWHEEL_ARMS, PINWHEEL_RADIAL_STD, PINWHEEL_TANGENTIAL_STD, PINWHEEL_RATE, PINWHEEL_SCALE = 5, 0.3, 0.05, 0.25, 1.9
SPIRALS_TURNS, SPIRALS_RADIUS, SPIRALS_NOISE = 1.5, 3.5, 0.1


def _on_circle(radius: np.ndarray, angle: np.ndarray) -> np.ndarray:
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)  # (N, 2)


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    upper = rng.random(n) < 0.5
    # The lower moon runs over angles pi..2 pi, so it opens upwards and interleaves with the upper one.
    angle = rng.uniform(0.0, np.pi, n) + np.where(upper, 0.0, np.pi)
    centres = np.where(upper[:, None], MOONS_CENTRES[0], MOONS_CENTRES[1])  # (N, 2)
    points = centres + _on_circle(np.full(n, MOONS_RADIUS), angle)
    return points + MOONS_NOISE * rng.standard_normal((n, 2))


def _circles(n: int, rng: np.random.Generator) -> np.ndarray:
    radius = np.asarray(CIRCLES_RADII)[rng.integers(0, 2, n)]
    points = _on_circle(radius, rng.uniform(0.0, 2 * np.pi, n))
    return points + CIRCLES_NOISE * rng.standard_normal((n, 2))


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    side = 2 * CHECKER_HALF_WIDTH / CHECKER_CELLS
    column = rng.integers(0, CHECKER_CELLS, n)
    # Half of the rows in each column are black; pick one of them and shift by the column's parity.
    row = 2 * rng.integers(0, CHECKER_CELLS // 2, n) + column % 2
    corner = np.stack([column, row], axis=1) * side - CHECKER_HALF_WIDTH  # (N, 2)
    return corner + side * rng.random((n, 2))


def _gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    angle = 2 * np.pi * rng.integers(0, GAUSSIANS_COUNT, n) / GAUSSIANS_COUNT
    centres = _on_circle(np.full(n, GAUSSIANS_RADIUS), angle)
    return centres + GAUSSIANS_STD * rng.standard_normal((n, 2))


def _pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    arm = rng.integers(0, PINWHEEL_ARMS, n)
    radial = 1.0 + PINWHEEL_RADIAL_STD * rng.standard_normal(n)
    tangential = PINWHEEL_TANGENTIAL_STD * rng.standard_normal(n)
    angle = 2 * np.pi * arm / PINWHEEL_ARMS + PINWHEEL_RATE * np.exp(radial)
    cos, sin = np.cos(angle), np.sin(angle)
    points = np.stack([cos * radial - sin * tangential, sin * radial + cos * tangential], axis=1)  # (N, 2)
    return PINWHEEL_SCALE * points


def _spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    max_angle = 2 * np.pi * SPIRALS_TURNS
    # sqrt spreads the points evenly along the curve's length rather than its angle, roughly.
    angle = max_angle * np.sqrt(rng.random(n))
    radius = SPIRALS_RADIUS * angle / max_angle
    second = rng.random(n) < 0.5
    points = _on_circle(radius, angle + np.where(second, np.pi, 0.0))
    return points + SPIRALS_NOISE * rng.standard_normal((n, 2))


_GENERATORS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "moons": _moons,
    "circles": _circles,
    "checkerboard": _checkerboard,
    "8gaussians": _gaussians,
    "pinwheel": _pinwheel,
    "spirals": _spirals,
}


def _generate(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if name not in _GENERATORS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of: {', '.join(TOY_DATASETS)}")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return _GENERATORS[name](int(n), rng).astype(np.float32)


def make_toy(name: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` points of the toy set ``name`` as a float32 (n, 2) array, the same for the same seed."""
    return _generate(name, n, np.random.default_rng(seed))


def toy_splits(name: str, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Independent train/val/test draws of the toy set ``name``, keyed by split name.

    Each split gets its own stream, spawned from ``seed``, so changing one split's size leaves the
    other splits' points unchanged.
    """
    streams = np.random.SeedSequence(seed).spawn(len(SPLIT_NAMES))
    sizes = (n_train, n_val, n_test)
    return {
        split: _generate(name, size, np.random.default_rng(stream))
        for split, size, stream in zip(SPLIT_NAMES, sizes, streams, strict=True)
    }
