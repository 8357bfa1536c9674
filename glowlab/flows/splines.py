"""Monotone elementwise splines on ``[-bound, bound]`` with identity tails, as pure functions.

Both maps send ``[-bound, bound]`` onto itself and leave everything outside unchanged, so a flow
built from them is a bijection of the whole real line. Parameters are unnormalised (any real
values): the functions turn them into valid bin sizes and slopes themselves, which is what lets a
neural network output them directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _knots(unnormalised: Tensor, min_size: float, bound: float) -> tuple[Tensor, Tensor]:
    """Bin sizes (..., K) summing to ``2 * bound`` and the K + 1 knot positions (..., K + 1)."""
    num_bins = unnormalised.shape[-1]
    if min_size * num_bins >= 1.0:
        raise ValueError(f"min_bin_width/min_bin_height={min_size} is too large for {num_bins} bins")
    fractions = min_size + (1.0 - min_size * num_bins) * torch.softmax(unnormalised, dim=-1)
    knots = F.pad(torch.cumsum(fractions, dim=-1), (1, 0))  # (..., K) -> (..., K + 1)
    knots = 2.0 * bound * knots - bound
    # The cumulative sum rounds: pin the end knots so the map sends the interval exactly onto itself.
    knots = torch.cat(
        [torch.full_like(knots[..., :1], -bound), knots[..., 1:-1], torch.full_like(knots[..., :1], bound)], -1
    )
    return knots[..., 1:] - knots[..., :-1], knots


def _bin_index(knots: Tensor, v: Tensor) -> Tensor:
    """Index (..., 1) of the bin of each ``v`` given the knots (..., K + 1); ends fall in the end bins."""
    interior = knots[..., 1:-1].contiguous()  # (..., K - 1): searchsorted needs a dense last dim
    return torch.searchsorted(interior, v[..., None].contiguous(), right=True)


def _pick(t: Tensor, index: Tensor) -> Tensor:
    """``t[..., index]`` for a per-element index of shape (..., 1); returns shape (...)."""
    return torch.gather(t, -1, index).squeeze(-1)


def _identity_outside(x: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """Mask of the elements inside ``[-bound, bound]``, and ``x`` with the outside ones set to 0."""
    inside = (x >= -bound) & (x <= bound)
    # The spline branch is evaluated everywhere and discarded outside; feeding it a harmless inside
    # point keeps its values and gradients finite, so torch.where cannot leak NaN gradients. (Not
    # clamp: its gradient vanishes at exactly ±bound, where the spline is still in use.)
    return inside, torch.where(inside, x, torch.zeros_like(x))


def rational_quadratic_spline(
    x: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    inverse: bool = False,
    bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """Monotone rational-quadratic spline with ``K`` bins on ``[-bound, bound]``, identity outside.

    ``widths`` and ``heights`` (..., K) are softmax-normalised bin sizes; ``derivatives`` (..., K - 1)
    are the slopes at the interior knots through ``min_derivative + softplus``, shifted so that an
    unnormalised value of 0 means slope 1 (all-zero parameters give the identity). The slopes at
    ``±bound`` are 1, so value and slope are continuous where the linear tails begin. Parameters
    broadcast against ``x`` (...). Returns ``(y, log|dy/dx|)`` elementwise; with ``inverse=True``,
    ``y`` is the inverse map at ``x`` and the log-derivative is that of the inverse map.

    References: Durkan et al., "Neural Spline Flows", NeurIPS 2019.
    """
    num_bins = widths.shape[-1]
    if heights.shape[-1] != num_bins or derivatives.shape[-1] != num_bins - 1:
        raise ValueError(
            f"expected K widths, K heights and K - 1 derivatives, got {widths.shape[-1]}, "
            f"{heights.shape[-1]}, {derivatives.shape[-1]}"
        )
    # Normalise before broadcasting: shared parameters (one spline per feature) are normalised once,
    # not once per example.
    bin_widths, x_knots = _knots(widths, min_bin_width, bound)
    bin_heights, y_knots = _knots(heights, min_bin_height, bound)
    shift = math.log(math.expm1(1.0 - min_derivative))  # softplus(shift) + min_derivative == 1
    slopes = min_derivative + F.softplus(derivatives + shift)
    ones = torch.ones_like(slopes[..., :1])
    slopes = torch.cat([ones, slopes, ones], dim=-1)  # (..., K + 1): slope 1 at ±bound
    bin_widths, bin_heights = (t.expand(*x.shape, num_bins) for t in (bin_widths, bin_heights))  # (..., K)
    x_knots, y_knots, slopes = (t.expand(*x.shape, num_bins + 1) for t in (x_knots, y_knots, slopes))  # (..., K + 1)

    inside, v = _identity_outside(x, bound)
    index = _bin_index(y_knots if inverse else x_knots, v)
    x_k, w_k = _pick(x_knots, index), _pick(bin_widths, index)
    y_k, h_k = _pick(y_knots, index), _pick(bin_heights, index)
    d_k, d_k1 = _pick(slopes, index), _pick(slopes, index + 1)
    s_k = h_k / w_k
    curvature = d_k1 + d_k - 2.0 * s_k

    if inverse:
        # Solve a xi^2 + b xi + c = 0 for the bin coordinate xi. Written as 2c / (-b - sqrt(.)), the
        # root in [0, 1] stays accurate as c -> 0 (near the left knot), where (-b + sqrt(.)) / 2a
        # would subtract two nearly equal numbers.
        dy = v - y_k
        a = h_k * (s_k - d_k) + dy * curvature
        b = h_k * d_k - dy * curvature
        c = -s_k * dy
        discriminant = (b * b - 4.0 * a * c).clamp_min(0.0)
        xi = ((2.0 * c) / (-b - discriminant.sqrt())).clamp(0.0, 1.0)
    else:
        xi = (v - x_k) / w_k
    xi_1m = xi * (1.0 - xi)
    denominator = s_k + curvature * xi_1m
    if inverse:
        out = x_k + xi * w_k
    else:
        out = y_k + h_k * (s_k * xi * xi + d_k * xi_1m) / denominator
    numerator = s_k * s_k * (d_k1 * xi * xi + 2.0 * s_k * xi_1m + d_k * (1.0 - xi) ** 2)
    log_derivative = torch.log(numerator) - 2.0 * torch.log(denominator)
    if inverse:
        log_derivative = -log_derivative
    y = torch.where(inside, out, x)
    return y, torch.where(inside, log_derivative, torch.zeros_like(log_derivative))


def piecewise_linear(
    x: Tensor, heights: Tensor, inverse: bool = False, bound: float = 3.0, min_bin_height: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """Monotone piecewise-linear map: ``K`` equal-width bins on ``[-bound, bound]``, identity outside.

    ``heights`` (..., K) are softmax-normalised output bin sizes, so ``[-bound, bound]`` maps onto
    itself; all-equal heights give the identity. Parameters broadcast against ``x`` (...). Returns
    ``(y, log|dy/dx|)`` elementwise, or the inverse map and its log-derivative with ``inverse=True``.

    References: Müller et al., "Neural Importance Sampling", ACM Transactions on Graphics 2019.
    """
    num_bins = heights.shape[-1]
    bin_heights, y_knots = _knots(heights, min_bin_height, bound)
    bin_heights, y_knots = (
        bin_heights.expand(*x.shape, num_bins),
        y_knots.expand(*x.shape, num_bins + 1),
    )  # (..., K), (..., K + 1)
    width = 2.0 * bound / num_bins
    inside, v = _identity_outside(x, bound)
    if inverse:
        index = _bin_index(y_knots, v)
    else:
        index = ((v + bound) / width).floor().long().clamp(0, num_bins - 1)[..., None]  # (..., 1)
    x_k = index.squeeze(-1).to(x.dtype) * width - bound
    y_k, h_k = _pick(y_knots, index), _pick(bin_heights, index)
    log_slope = torch.log(h_k / width)
    if inverse:
        out, log_derivative = x_k + (v - y_k) * (width / h_k), -log_slope
    else:
        out, log_derivative = y_k + (v - x_k) * (h_k / width), log_slope
    y = torch.where(inside, out, x)
    return y, torch.where(inside, log_derivative, torch.zeros_like(log_derivative))
