"""Vector flows: exact inverses, log-determinants against brute-force Jacobians, MADE masks, splines."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from helpers import perturb

from glowlab.flows.autoregressive import IAF, MAF
from glowlab.flows.conv1x1 import InvConv1x1LU
from glowlab.flows.elementwise import ElementwiseAffine, ElementwiseSpline, LeakyReLU, PiecewiseLinear
from glowlab.flows.linear import LULinear
from glowlab.flows.made import MADE
from glowlab.flows.splines import piecewise_linear, rational_quadratic_spline
from glowlab.flows.vector_coupling import VectorCoupling

D, B, BOUND = 5, 4, 3.0
IMAGE = (2, 2, 2)  # (C, H, W) for the elementwise affine on images

ZERO_INITIALISED: dict[str, Callable[[], torch.nn.Module]] = {
    "elementwise_affine": lambda: ElementwiseAffine(D),
    "piecewise_linear": lambda: PiecewiseLinear(D, bins=6, bound=BOUND),
    "elementwise_spline": lambda: ElementwiseSpline(D, bins=6, bound=BOUND),
    "maf_spline": lambda: MAF(D, 16, transformer="spline", bins=5, bound=BOUND, order="reversed"),
}


def sample(seed: int) -> torch.Tensor:
    """Inputs spread over and beyond [-BOUND, BOUND], with some certainly outside (spline tails)."""
    gen = torch.Generator().manual_seed(seed)
    x = 2.5 * torch.randn((B, D), generator=gen, dtype=torch.float64)
    x[0, 0], x[1, 1], x[2, -1] = 4.5, -5.0, 3.5
    return x


@pytest.mark.parametrize("name", list(ZERO_INITIALISED))
def test_zero_initialised_layers_start_as_identity(name: str) -> None:
    layer, x = ZERO_INITIALISED[name]().double(), sample(0)
    y, logdet = layer(x)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, torch.zeros(B, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", ["natural", "reversed"])
@pytest.mark.parametrize("hidden_layers", [0, 2])
def test_made_is_autoregressive(order: str, hidden_layers: int) -> None:
    made = perturb(MADE(D, 12, hidden_layers, params_per_feature=3, order=order).double(), scale=0.5)
    x = torch.randn(D, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: made(v[None])[0], x)  # (D, P, D): out feature, param, input
    assert jac.shape == (D, 3, D)
    position = torch.arange(D) if order == "natural" else torch.arange(D - 1, -1, -1)
    allowed = position[None, :] < position[:, None]  # (out, in): strictly earlier inputs only
    assert torch.all(jac.abs().amax(dim=1)[~allowed] == 0)
    # Every permitted dependency exists, so the masks are not stricter than autoregressive.
    assert torch.all(jac.abs().amax(dim=1)[allowed] > 0)


@pytest.mark.parametrize("transformer", ["affine", "spline"])
def test_iaf_mirrors_maf_with_the_same_weights(transformer: str) -> None:
    maf = perturb(MAF(D, 16, transformer=transformer, bins=5).double(), scale=0.5, seed=3)
    iaf = IAF(D, 16, transformer=transformer, bins=5).double()
    iaf.load_state_dict(maf.state_dict())
    x, z = sample(0), sample(1)
    y, logdet = iaf(x)
    x_maf, logdet_maf = maf.inverse_with_logdet(x)
    assert torch.equal(y, x_maf) and torch.equal(logdet, logdet_maf)
    assert torch.equal(iaf(x)[0], maf.inverse(x))
    assert torch.equal(iaf.inverse(z), maf(z)[0])
    assert torch.equal(iaf.inverse_with_logdet(z)[1], maf(z)[1])
    assert (maf(z)[0] - z).abs().max() > 1e-2


@pytest.mark.parametrize("parity", [0, 1])
def test_coupling_keeps_the_conditioning_half(parity: int) -> None:
    layer = perturb(VectorCoupling(D, 16, transformer="affine", parity=parity).double())
    x = sample(0)
    y, _ = layer(x)
    kept = torch.arange(D) % 2 == parity
    assert torch.equal(y[:, kept], x[:, kept])
    assert torch.all((y[:, ~kept] - x[:, ~kept]).abs() > 0)


def test_lu_linear_is_its_assembled_weight() -> None:
    layer = perturb(LULinear(D).double())
    x = sample(0)
    w = layer.weight()
    y, logdet = layer(x)
    torch.testing.assert_close(y, x @ w.T + layer.bias)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(w)[1].expand(B))
    torch.testing.assert_close(layer.weight_inverse() @ w, torch.eye(D, dtype=torch.float64))


def test_lu_layers_share_their_parameter_names() -> None:
    conv_keys = set(InvConv1x1LU(D).state_dict())
    assert conv_keys == {"p", "sign_s", "lower_mask", "eye", "lower", "upper", "log_s"}
    assert set(LULinear(D).state_dict()) == conv_keys | {"bias"}


# --- The spline functions themselves ---------------------------------------------------------------

K = 5


def spline_params(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised widths, heights (3, K) and derivatives (3, K - 1) for 3 features, far from identity."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(2.0 * torch.randn(3, n, generator=gen, dtype=torch.float64) for n in (K, K, K - 1))


SPLINES: dict[str, Callable] = {
    "rational_quadratic": lambda v, p, inverse=False: rational_quadratic_spline(v, *p, inverse=inverse, bound=BOUND),
    "piecewise_linear": lambda v, p, inverse=False: piecewise_linear(v, p[1], inverse=inverse, bound=BOUND),
}


def grid() -> torch.Tensor:
    """(N, 3): a dense grid over [-5, 5] (both tails and ±BOUND exactly) for each of 3 features."""
    return torch.linspace(-5.0, 5.0, 1001, dtype=torch.float64)[:, None].expand(-1, 3).contiguous()


def knots(unnormalised: torch.Tensor, min_size: float = 1e-3) -> torch.Tensor:
    """Knot positions from the paper's definition: bins of size min + (1 - K min) softmax, over [-B, B]."""
    sizes = min_size + (1 - min_size * unnormalised.shape[-1]) * torch.softmax(unnormalised, -1)
    cumulative = torch.cat([torch.zeros_like(sizes[..., :1]), sizes.cumsum(-1)], -1)  # (..., K + 1)
    return 2 * BOUND * cumulative - BOUND


@pytest.mark.parametrize("kind", list(SPLINES))
def test_spline_is_monotone_and_inverts(kind: str) -> None:
    fn, p, x = SPLINES[kind], spline_params(0), grid()
    y, logabsdet = fn(x, p)
    assert torch.all(torch.diff(y, dim=0) > 0)
    assert (fn(y, p, inverse=True)[0] - x).abs().max() < 1e-12
    assert (fn(fn(x, p, inverse=True)[0], p)[0] - x).abs().max() < 1e-12
    outside = x.abs() > BOUND
    assert torch.equal(y[outside], x[outside]) and torch.all(logabsdet[outside] == 0)
    assert (y[~outside] - x[~outside]).abs().max() > 0.1


@pytest.mark.parametrize("kind", list(SPLINES))
@pytest.mark.parametrize("inverse", [False, True])
def test_spline_logabsdet_is_the_derivative(kind: str, inverse: bool) -> None:
    fn, p = SPLINES[kind], spline_params(1)
    # Offset so no point sits on a piecewise-linear knot, where the derivative jumps.
    x = (grid() + 1e-4).requires_grad_(True)
    y, logabsdet = fn(x, p, inverse=inverse)
    (derivative,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(logabsdet, derivative.log(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", list(SPLINES))
def test_spline_is_continuous_at_knots_and_bound(kind: str) -> None:
    fn, p = SPLINES[kind], spline_params(2)
    widths, heights, _ = p
    x_knots = (
        knots(widths)
        if kind == "rational_quadratic"
        else torch.linspace(-BOUND, BOUND, K + 1, dtype=torch.float64).expand(3, -1)
    )
    x_knots, y_knots = x_knots.T.contiguous(), knots(heights).T  # (K + 1, 3)
    eps = 1e-9
    below, above = fn(x_knots - eps, p)[0], fn(x_knots + eps, p)[0]
    # At most a few eps apart (slopes are bounded), and the knots map onto the knots.
    assert (above - below).abs().max() < 1e-6
    torch.testing.assert_close(fn(x_knots, p)[0], y_knots, rtol=0, atol=1e-12)
    if kind == "rational_quadratic":
        # Slope 1 at ±bound: the tails continue the spline smoothly.
        edge = torch.tensor([[-BOUND] * 3, [BOUND] * 3], dtype=torch.float64)
        torch.testing.assert_close(fn(edge, p)[1], torch.zeros(2, 3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_rational_quadratic_spline_with_zero_parameters_is_the_identity() -> None:
    x = grid()
    zeros = torch.zeros(3, K, dtype=torch.float64)
    y, logabsdet = rational_quadratic_spline(x, zeros, zeros, zeros[:, 1:], bound=BOUND)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(logabsdet, torch.zeros_like(x), rtol=0, atol=1e-12)


# --- Options --------------------------------------------------------------------------------------

INVALID: list[tuple[Callable[[], object], str]] = [
    (lambda: MAF(D, transformer="additive"), "transformer='additive' is not one of 'affine', 'spline'"),
    (lambda: IAF(D, transformer="splne"), "transformer='splne'"),
    (lambda: MAF(D, order="random"), "order='random' is not one of 'natural', 'reversed'"),
    (lambda: MAF(D, transformer="spline", bins=1), "bins=1"),
    (lambda: MADE(D, 8, order="shuffled"), "order='shuffled'"),
    (
        lambda: VectorCoupling(D, transformer="affin"),
        "transformer='affin' is not one of 'affine', 'additive', 'spline'",
    ),
    (lambda: VectorCoupling(1), "features=1"),
    (lambda: VectorCoupling(D, parity=2), "parity=2"),
    (lambda: VectorCoupling(D, transformer="spline", bound=0.0), "bound=0.0"),
    (lambda: LeakyReLU(0.0), "negative_slope=0.0"),
    (lambda: LeakyReLU(1.5), "negative_slope=1.5"),
    (lambda: PiecewiseLinear(D, bins=1), "bins=1"),
    (lambda: ElementwiseSpline(D, bound=-1.0), "bound=-1.0"),
]


@pytest.mark.parametrize(
    ("build", "message"), INVALID, ids=[m.split("=")[0] + str(i) for i, (_, m) in enumerate(INVALID)]
)
def test_invalid_options_raise_value_error(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        build()
