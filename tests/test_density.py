"""Vector flow models of every family: normalised densities, consistent sampling, the builder's errors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import per_example_slogdet, perturb

from glowlab.flows.base import standard_normal_log_prob
from glowlab.models.density import FAMILIES, FlowModel, make_vector_flow
from glowlab.plots import grid_points

SMALL = {"hidden_features": 16, "hidden_layers": 1}
# Options that keep each family exact and quick in float64 tests: exact log-determinants, tight solves.
EXACT = {
    "iresnet": {"logdet": "exact"},
    "cnf": {"divergence": "exact", "eval_divergence": "exact", "adjoint": False, "rtol": 1e-8, "atol": 1e-8},
    # Slope 0.1 stretches the negative side 10x per layer when sampling: too wide a window to grid.
    "lu-leakyrelu": {"negative_slope": 0.5},
}


def model_of(family: str, features: int = 2, layers: int = 3, seed: int = 0) -> FlowModel:
    torch.manual_seed(seed)
    flow = make_vector_flow(family, features, layers, options=EXACT.get(family), **SMALL)
    return perturb(FlowModel(flow, features).double(), scale=0.2, seed=seed).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_density_integrates_to_one_on_a_grid(family: str) -> None:
    model = model_of(family)
    # A window holding (nearly) all the mass, found from samples; cells of at most 0.08 per side.
    bound = max(5.0, 1.2 * float(model.sample(20000, generator=torch.Generator().manual_seed(0)).abs().max()))
    assert bound < 60, f"{family}: samples reach {bound:.0f}, too wide to integrate on a grid"
    points, cell_area = grid_points(bound, int(2 * bound / 0.08))
    with torch.enable_grad():
        log_p = torch.cat([model.log_prob(p).detach() for p in torch.as_tensor(points).split(8192)])
    mass = float(log_p.exp().sum() * cell_area)
    assert abs(mass - 1.0) < 0.02, f"{family}: density integrates to {mass:.4f}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sample_log_prob_matches_density_and_jacobian(family: str) -> None:
    model = model_of(family, features=3)
    torch.manual_seed(1)
    x, log_q = model.sample_with_log_prob(5)
    x = x.detach()
    with torch.enable_grad():
        log_p = model.log_prob(x).detach()
    torch.testing.assert_close(log_q.detach(), log_p, rtol=1e-6, atol=1e-6)
    # log p(x) = log N(f(x)) + log|det df/dx| with the Jacobian by brute force.
    z = model.encode(x)[0].detach()
    brute = standard_normal_log_prob(z) + per_example_slogdet(lambda v: model.encode(v)[0], x)
    torch.testing.assert_close(log_p, brute, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.decode(z), x, rtol=1e-6, atol=1e-6)


def test_sample_temperature_scales_the_base() -> None:
    model = model_of("realnvp")
    gen = torch.Generator().manual_seed(0)
    cold = model.sample(4, temperature=0.0, generator=gen)
    assert torch.allclose(cold, model.decode(torch.zeros(4, 2, dtype=torch.float64)))


def test_builder_errors_name_the_option() -> None:
    with pytest.raises(ValueError, match="family='glow-vector' is not one of"):
        make_vector_flow("glow-vector", 2)
    with pytest.raises(ValueError, match="family 'maf' has no option 'lipschitz'"):
        make_vector_flow("maf", 2, options={"lipschitz": 0.9})
    with pytest.raises(ValueError, match="has no option 'transformer'"):
        make_vector_flow("maf", 2, options={"transformer": "spline"})
    with pytest.raises(ValueError, match=r"expected vectors of shape \(B, 2\)"):
        FlowModel(make_vector_flow("maf", 2), 2).log_prob(torch.zeros(3, 4))


def test_families_alternate_and_scale_as_documented() -> None:
    maf = make_vector_flow("maf", 4, layers=3)
    assert [layer.order for layer in maf.layers] == ["natural", "reversed", "natural"]
    nice = make_vector_flow("nice", 4, layers=2)
    assert type(nice.layers[-1]).__name__ == "ElementwiseAffine"
    lu = make_vector_flow("lu-spline", 4, layers=2)
    assert [type(layer).__name__ for layer in lu.layers] == ["LULinear", "ElementwiseSpline"] * 2 + ["LULinear"]


def test_standardize_keeps_log_density_in_data_units() -> None:
    from glowlab.flows.base import FlowSequence
    from glowlab.flows.standardize import Standardize

    body = make_vector_flow("realnvp", 2, 2, **SMALL)
    perturb(body, 0.2)
    mean, std = [1.0, -2.0], [3.0, 0.5]
    wrapped = FlowModel(FlowSequence([Standardize(mean, std), *body.layers]), 2).double()
    plain = FlowModel(body, 2).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    raw = x * torch.tensor(std, dtype=torch.float64) + torch.tensor(mean, dtype=torch.float64)
    expected = plain.log_prob(x) - math.log(3.0 * 0.5)
    torch.testing.assert_close(wrapped.log_prob(raw), expected)
    with pytest.raises(ValueError, match="std must be positive"):
        Standardize([0.0], [0.0])
