"""Elementwise flows, and the conditioned elementwise transformers that autoregressive and coupling
layers apply with parameters predicted by a network.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from glowlab.flows.base import Flow, check_option, sum_except_batch
from glowlab.flows.splines import piecewise_linear, rational_quadratic_spline

TRANSFORMERS = ("affine", "additive", "spline")

# Affine log-scales are soft-clamped to (-SCALE_BOUND, SCALE_BOUND): exp() of an unbounded network
# output can overflow, above all in the sequential inverse of an autoregressive flow, where one
# large scale is divided into every later dimension.
SCALE_BOUND = 3.0


def check_spline_options(bins: int, bound: float) -> None:
    """A spline needs at least two bins (one bin is the identity) and a positive interval."""
    if bins < 2:
        raise ValueError(f"bins={bins} must be at least 2")
    if not bound > 0:
        raise ValueError(f"bound={bound} must be positive")


def transformer_params(transformer: str, bins: int = 8) -> int:
    """How many parameters per dimension the named transformer takes."""
    check_option("transformer", transformer, TRANSFORMERS)
    return {"affine": 2, "additive": 1, "spline": 3 * bins - 1}[transformer]


def apply_transformer(
    transformer: str, x: Tensor, params: Tensor, inverse: bool = False, bound: float = 3.0
) -> tuple[Tensor, Tensor]:
    """The elementwise transformer ``tau(x; params)`` (or its inverse) and its log-derivative.

    ``x`` has shape (...), ``params`` shape (..., P) with ``P = transformer_params(...)``:
    ``"affine"``: ``x * exp(s) + m`` with ``params = (m, raw s)`` and ``s = 3 tanh(raw / 3)``;
    ``"additive"``: ``x + m``; ``"spline"``: a rational-quadratic spline on ``[-bound, bound]`` with
    ``params = (K widths, K heights, K - 1 derivatives)``. All-zero parameters give the identity.
    """
    check_option("transformer", transformer, TRANSFORMERS)
    if transformer == "affine":
        shift = params[..., 0]
        log_scale = SCALE_BOUND * torch.tanh(params[..., 1] / SCALE_BOUND)
        if inverse:
            return (x - shift) * torch.exp(-log_scale), -log_scale
        return x * torch.exp(log_scale) + shift, log_scale
    if transformer == "additive":
        shift = params[..., 0]
        return (x - shift if inverse else x + shift), torch.zeros_like(x)
    bins = (params.shape[-1] + 1) // 3
    widths, heights, derivatives = params[..., :bins], params[..., bins : 2 * bins], params[..., 2 * bins :]
    return rational_quadratic_spline(x, widths, heights, derivatives, inverse=inverse, bound=bound)


class Elementwise(Flow):
    """Base for flows acting on each element independently: the log-determinant is a sum of
    log-derivatives, and the inverse is as cheap as the forward pass.

    Subclasses implement ``transform(v, inverse) -> (out, log_derivative)``, both of ``v``'s shape.

    References: Papamakarios et al., "Normalizing Flows for Probabilistic Modeling and Inference", JMLR 2021.
    """

    def transform(self, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, log_derivative = self.transform(x, inverse=False)
        return y, sum_except_batch(log_derivative)

    def inverse(self, y: Tensor) -> Tensor:
        return self.transform(y, inverse=True)[0]

    def inverse_with_logdet(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x, log_derivative = self.transform(y, inverse=True)
        return x, sum_except_batch(log_derivative)


class ElementwiseAffine(Elementwise):
    """``y = x * exp(log_scale) + shift`` with parameters of ``shape`` (the trailing shape of ``x``,
    or one that broadcasts to it, e.g. ``(C, 1, 1)`` for images); starts as the identity.

    References: Dinh et al., "NICE: Non-linear Independent Components Estimation", 2014.
    """

    def __init__(self, shape: int | tuple[int, ...]) -> None:
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.shift = nn.Parameter(torch.zeros(shape))

    def transform(self, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        # Broadcast the log-scale to every element: a (C, 1, 1) scale counts once per pixel.
        log_scale = self.log_scale.expand_as(v)
        if inverse:
            return (v - self.shift) * torch.exp(-self.log_scale), -log_scale
        return v * torch.exp(self.log_scale) + self.shift, log_scale


class LeakyReLU(Elementwise):
    """``y = x`` for ``x >= 0`` and ``negative_slope * x`` otherwise, a fixed slope in (0, 1].

    References: Papamakarios et al., "Normalizing Flows for Probabilistic Modeling and Inference", JMLR 2021.
    """

    def __init__(self, negative_slope: float = 0.1) -> None:
        super().__init__()
        if not 0.0 < negative_slope <= 1.0:
            raise ValueError(f"negative_slope={negative_slope} must be in (0, 1]")
        self.negative_slope = negative_slope

    def transform(self, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        # Positive slope keeps the sign, so the branch is chosen by v's sign in both directions.
        negative = v < 0
        log_slope = -math.log(self.negative_slope) if inverse else math.log(self.negative_slope)
        slope = math.exp(log_slope)
        out = torch.where(negative, v * slope, v)
        return out, torch.where(negative, torch.full_like(v, log_slope), torch.zeros_like(v))


class PiecewiseLinear(Elementwise):
    """A learned monotone piecewise-linear map per feature on ``[-bound, bound]``, identity outside.

    ``bins`` equal-width input bins with learned (softmax-normalised) output heights; equal heights,
    the initial value, make it the identity. Inputs have shape (B, features).

    References: Müller et al., "Neural Importance Sampling", ACM Transactions on Graphics 2019.
    """

    def __init__(self, features: int, bins: int = 8, bound: float = 3.0) -> None:
        super().__init__()
        check_spline_options(bins, bound)
        self.bound = bound
        self.heights = nn.Parameter(torch.zeros(features, bins))

    def transform(self, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        return piecewise_linear(v, self.heights, inverse=inverse, bound=self.bound)


class ElementwiseSpline(Elementwise):
    """A learned monotone rational-quadratic spline per feature on ``[-bound, bound]``, identity outside.

    Parameters per feature: ``bins`` widths, ``bins`` heights, ``bins - 1`` interior derivatives,
    all zero at first, which is exactly the identity. Inputs have shape (B, features).

    References: Durkan et al., "Neural Spline Flows", NeurIPS 2019.
    """

    def __init__(self, features: int, bins: int = 8, bound: float = 3.0) -> None:
        super().__init__()
        check_spline_options(bins, bound)
        self.bound = bound
        self.params = nn.Parameter(torch.zeros(features, transformer_params("spline", bins)))

    def transform(self, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        return apply_transformer("spline", v, self.params, inverse=inverse, bound=self.bound)
