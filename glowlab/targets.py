"""Unnormalised 2-D target densities p~(z) = exp(-U(z)) for fitting flows by reverse KL.

The four energies are those of Rezende & Mohamed (2015), Table 1, with

    w1(z) = sin(2 pi z1 / 4),  w2(z) = 3 exp(-0.5 ((z1 - 1) / 0.6)^2),  w3(z) = 3 sigmoid((z1 - 1) / 0.3)

    U1(z) = 0.5 ((|z| - 2) / 0.4)^2 - log(exp(-0.5 ((z1 - 2) / 0.6)^2) + exp(-0.5 ((z1 + 2) / 0.6)^2))
    U2(z) = 0.5 ((z2 - w1) / 0.4)^2
    U3(z) = -log(exp(-0.5 ((z2 - w1) / 0.35)^2) + exp(-0.5 ((z2 - w1 + w2) / 0.35)^2))
    U4(z) = -log(exp(-0.5 ((z2 - w1) / 0.4)^2) + exp(-0.5 ((z2 - w1 + w3) / 0.35)^2))

Integrability, and the choice made here: U1 confines z to a ring, so exp(-U1) is integrable and is
used as in the paper. U2-U4 do not grow as |z1| grows, so exp(-U) has infinite mass over the plane
and no proper density exists; the paper only draws them on the window [-4, 4]^2. Cutting the target
off at the window would make KL(q || p) infinite for any flow q with mass outside it, so instead
U2-U4 here carry a smooth, weak envelope in z1,

    U(z) = U_paper(z) + 0.5 (z1 / ENVELOPE_SCALE)^4,    ENVELOPE_SCALE = 3,

which is flat near the centre (factor 0.91 on the density at |z1| = 2, 0.61 at 3, 0.21 at the
window's edge 4) and then falls fast, leaving about 3 % of the z1-mass outside |z1| < 4 and a
negligible amount beyond |z1| = 10. (U4's second branch itself sits near z2 = -4 around z1 = 3, so
part of its mass lies below the window in z2 whatever the envelope.) With the envelope every target
is a proper density on the whole plane; ``log_normaliser`` integrates it on a grid large enough
that the mass left out is negligible (``INTEGRATION_BOUND``), so

    KL(q || p) = E_q[log q(z) + U(z)] + log_normaliser(name)

is finite and exact up to the quadrature error. ``energy_window`` is only for plotting.

References: Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

ENERGIES = ("u1", "u2", "u3", "u4")
ENVELOPE_SCALE = 3.0
PLOT_WINDOW = 4.0
# Half-widths of the square on which log_normaliser integrates. Beyond them exp(-U) is below
# e^-30 or so (U1: the ring's Gaussian at radius 6 is 10 standard deviations out; U2-U4: the
# envelope alone is 0.5 (10 / 3)^4 = 62 at |z1| = 10, and in z2 every branch is > 14 of its
# standard deviations away at |z2| = 10).
INTEGRATION_BOUND = {"u1": 6.0, "u2": 10.0, "u3": 10.0, "u4": 10.0}
DEFAULT_RESOLUTION = 500


def _gauss_log(x: Tensor, centre: Tensor | float, std: float) -> Tensor:
    return -0.5 * ((x - centre) / std) ** 2


def _u1(z1: Tensor, z2: Tensor) -> Tensor:
    # vector_norm's gradient at the origin is 0, where sqrt(z1^2 + z2^2) would give NaN.
    radius = torch.linalg.vector_norm(torch.stack([z1, z2], dim=-1), dim=-1)
    modes = torch.stack([_gauss_log(z1, 2.0, 0.6), _gauss_log(z1, -2.0, 0.6)])  # (2, B)
    return 0.5 * ((radius - 2.0) / 0.4) ** 2 - torch.logsumexp(modes, dim=0)


def _w1(z1: Tensor) -> Tensor:
    return torch.sin(2.0 * math.pi * z1 / 4.0)


def _envelope(z1: Tensor) -> Tensor:
    return 0.5 * (z1 / ENVELOPE_SCALE) ** 4


def _u2(z1: Tensor, z2: Tensor) -> Tensor:
    return 0.5 * ((z2 - _w1(z1)) / 0.4) ** 2 + _envelope(z1)


def _u3(z1: Tensor, z2: Tensor) -> Tensor:
    w1 = _w1(z1)
    w2 = 3.0 * torch.exp(_gauss_log(z1, 1.0, 0.6))
    branches = torch.stack([_gauss_log(z2, w1, 0.35), _gauss_log(z2, w1 - w2, 0.35)])  # (2, B)
    return -torch.logsumexp(branches, dim=0) + _envelope(z1)


def _u4(z1: Tensor, z2: Tensor) -> Tensor:
    w1 = _w1(z1)
    w3 = 3.0 * torch.sigmoid((z1 - 1.0) / 0.3)
    branches = torch.stack([_gauss_log(z2, w1, 0.4), _gauss_log(z2, w1 - w3, 0.35)])  # (2, B)
    return -torch.logsumexp(branches, dim=0) + _envelope(z1)


_ENERGY_FUNCTIONS = {"u1": _u1, "u2": _u2, "u3": _u3, "u4": _u4}


def _check_name(name: str) -> None:
    if name not in _ENERGY_FUNCTIONS:
        raise ValueError(f"unknown energy {name!r}; choose one of: {', '.join(ENERGIES)}")


def energy(name: str, z: Tensor) -> Tensor:
    """U(z) for points ``z`` of shape (B, 2), shape (B,); the unnormalised log density is -U(z).

    Differentiable, and computed in ``z``'s dtype and on its device. U2-U4 include the z1 envelope
    described in the module docstring.
    """
    _check_name(name)
    if z.ndim != 2 or z.shape[1] != 2:
        raise ValueError(f"energy expects points of shape (B, 2), got {tuple(z.shape)}")
    return _ENERGY_FUNCTIONS[name](z[:, 0], z[:, 1])


def energy_window(name: str) -> float:
    """Half-width of the square [-w, w]^2 to plot the target ``name`` on (the paper's window)."""
    _check_name(name)
    return PLOT_WINDOW


@lru_cache(maxsize=64)
def log_normaliser(name: str, bound: float | None = None, resolution: int = DEFAULT_RESOLUTION) -> float:
    """log Z = log of the integral of exp(-U) over [-bound, bound]^2, by the midpoint rule.

    ``bound`` defaults to ``INTEGRATION_BOUND[name]``, where the mass left outside is negligible,
    making this the normaliser over the whole plane. The integrand is smooth and has decayed
    by the boundary, so the midpoint rule converges fast (resolutions 250 and 500 agree to ~1e-12).
    Computed in float64 on the CPU, in chunks of rows.
    """
    _check_name(name)
    if bound is None:
        bound = INTEGRATION_BOUND[name]
    if bound <= 0 or resolution < 1:
        raise ValueError(f"need bound > 0 and resolution >= 1, got bound={bound}, resolution={resolution}")
    step = 2.0 * bound / resolution
    centres = -bound + step * (torch.arange(resolution, dtype=torch.float64) + 0.5)
    row_logs = []
    rows_per_chunk = max(1, 2**20 // resolution)
    with torch.no_grad():
        for start in range(0, resolution, rows_per_chunk):
            z1, z2 = torch.meshgrid(centres, centres[start : start + rows_per_chunk], indexing="xy")  # (r, R) each
            points = torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=1)  # (r * R, 2)
            row_logs.append(torch.logsumexp(-energy(name, points), dim=0))
    return float(torch.logsumexp(torch.stack(row_logs), dim=0)) + 2.0 * math.log(step)


def log_prob(name: str, z: Tensor) -> Tensor:
    """Normalised log density -U(z) - log Z of the target ``name`` at ``z`` (B, 2), shape (B,)."""
    return -energy(name, z) - log_normaliser(name)
