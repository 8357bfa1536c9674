"""Residual (i-ResNet, i-RevNet) and planar/radial flows: inverses, log-determinants, estimators."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from helpers import per_example_slogdet, perturb
from torch import Tensor

from glowlab.flows.base import Flow
from glowlab.flows.nn import SpectralNormLinear
from glowlab.flows.planar import Planar, Radial
from glowlab.flows.residual import AdditiveResidual, InvertibleResidual
from glowlab.flows.trace import hutchinson_samples, hutchinson_trace, make_probes

B, D = 4, 3
DT = torch.float64


def iresnet(logdet: str = "exact", seed: int = 0, **kwargs: object) -> InvertibleResidual:
    """An i-ResNet block whose weights all hit the Lipschitz cap: large perturbation, then converge."""
    options = {"hidden_features": 16, "tolerance": 1e-12, "max_iterations": 200} | kwargs
    layer = InvertibleResidual(D, logdet=logdet, generator=torch.Generator().manual_seed(seed), **options).to(DT)
    perturb(layer, scale=0.5, seed=seed)
    layer.converge(2000)
    return layer.eval()


def hypercube_probes(b: int, d: int) -> Tensor:
    """All 2^d Rademacher sign vectors: their mean of v^T A v is tr(A) exactly."""
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=DT)  # (2^d, d)
    return signs[:, None, :].expand(-1, b, -1)  # (2^d, B, d)


def per_example_jacobian(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    jac = torch.autograd.functional.jacobian(fn, x)  # (B, D, B, D)
    return torch.stack([jac[i, :, i, :] for i in range(x.shape[0])])  # (B, D, D)


def x_rand(b: int = B, d: int = D, seed: int = 1) -> Tensor:
    return torch.randn(b, d, dtype=DT, generator=torch.Generator().manual_seed(seed))


# --- Hutchinson's estimator -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_with_the_predicted_variance(distribution: str) -> None:
    a = torch.randn(B, 5, 5, dtype=DT, generator=torch.Generator().manual_seed(0))  # one matrix per example

    def matvec(v: Tensor) -> Tensor:
        return (a @ v.unsqueeze(-1)).squeeze(-1)  # (B, 5, 5) @ (P, B, 5, 1) -> (P, B, 5)

    probes = 20000
    samples = hutchinson_samples(matvec, (B, 5), probes, distribution, torch.Generator().manual_seed(1), dtype=DT)
    assert samples.shape == (probes, B)
    exact = torch.diagonal(a, dim1=1, dim2=2).sum(dim=1)
    stderr = samples.std(dim=0) / probes**0.5
    assert ((samples.mean(dim=0) - exact).abs() < 4 * stderr).all()
    # Var(v^T A v) = 2 |S|_F^2 for Gaussian probes, minus the diagonal's share for Rademacher (S = sym(A)).
    sym = 0.5 * (a + a.transpose(1, 2))
    frob = 2 * sym.pow(2).sum(dim=(1, 2))
    predicted = (
        frob - 2 * torch.diagonal(sym, dim1=1, dim2=2).pow(2).sum(dim=1) if distribution == "rademacher" else frob
    )
    torch.testing.assert_close(samples.var(dim=0), predicted, rtol=0.1, atol=0)

    # hutchinson_trace is the mean of the same samples; averaging k probes divides the variance by k.
    trace = hutchinson_trace(matvec, (B, 5), probes, distribution, torch.Generator().manual_seed(1), dtype=DT)
    torch.testing.assert_close(trace, samples.mean(dim=0))
    gen = torch.Generator().manual_seed(2)
    repeats = torch.stack([hutchinson_trace(matvec, (B, 5), 16, distribution, gen, dtype=DT) for _ in range(400)])
    ratio = repeats.var(dim=0) / (predicted / 16)
    assert ((ratio > 0.7) & (ratio < 1.4)).all(), ratio


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_for_the_residual_jacobian(distribution: str) -> None:
    layer, x = iresnet(), x_rand()
    probes = 20000

    def vjp(v: Tensor) -> Tensor:
        x_rep = x.repeat(probes, 1).requires_grad_(True)  # (P * B, D)
        grad = torch.autograd.grad(layer.residual(x_rep), x_rep, v.reshape(-1, D))[0]  # (P * B, D)
        return grad.reshape(probes, B, D)  # (P, B, D)

    samples = hutchinson_samples(vjp, (B, D), probes, distribution, torch.Generator().manual_seed(5), dtype=DT)
    exact = torch.diagonal(per_example_jacobian(layer.residual, x), dim1=1, dim2=2).sum(dim=1)
    stderr = samples.std(dim=0) / probes**0.5
    assert (stderr > 0).all() and ((samples.mean(dim=0) - exact).abs() < 4 * stderr).all()


def test_probes_have_unit_second_moment() -> None:
    gen = torch.Generator().manual_seed(0)
    rad = make_probes((2, 3), 5000, "rademacher", gen, dtype=DT)
    assert rad.shape == (5000, 2, 3) and set(rad.unique().tolist()) == {-1.0, 1.0}
    gauss = make_probes((2, 3), 5000, "gaussian", gen, dtype=DT).reshape(5000, 6)  # (P, B * D)
    second_moment = gauss.T @ gauss / 5000  # (6, 6), should be close to I
    assert (second_moment - torch.eye(6, dtype=DT)).abs().max() < 0.1


# --- i-ResNet specifics ---------------------------------------------------------------------------------------------


def test_spectral_norm_caps_every_weight_and_the_residual_is_a_contraction() -> None:
    layer = iresnet(lipschitz=0.7)
    norms = [torch.linalg.matrix_norm(w, ord=2) for w in layer.effective_weights()]
    for lin, w, norm in zip(layer.linears, layer.effective_weights(), norms, strict=True):
        assert norm <= 0.7 * (1 + 1e-9)
        # The raw weights are above the cap, so the rescaling really acted (and the estimate converged).
        true_sigma = torch.linalg.matrix_norm(lin.weight, ord=2)
        assert true_sigma > 0.7
        torch.testing.assert_close(lin.spectral_norm_estimate(), true_sigma, rtol=1e-9, atol=0)
        torch.testing.assert_close(w, lin.weight * 0.7 / true_sigma, rtol=1e-9, atol=0)
    bound = torch.stack(norms).prod()
    assert bound < 1
    jac = per_example_jacobian(layer.residual, 3 * x_rand(b=16, seed=7))
    assert (torch.linalg.matrix_norm(jac, ord=2) <= bound + 1e-12).all()


def test_spectral_norm_leaves_small_weights_alone_and_updates_only_in_training() -> None:
    small = SpectralNormLinear(4, 3, lipschitz=0.9).to(DT)
    with torch.no_grad():
        small.weight.mul_(0.01)
    small.converge(100)
    assert torch.equal(small.normalized_weight(), small.weight)

    lin = perturb(SpectralNormLinear(6, 5, lipschitz=0.9, init_iterations=0).to(DT), scale=1.0)
    x = x_rand(d=6)
    u0 = lin.u.clone()
    lin.eval()
    first = lin(x)
    assert torch.equal(lin.u, u0) and torch.equal(lin(x), first)
    lin.train()
    lin(x)
    assert not torch.equal(lin.u, u0)


def test_training_forward_advances_power_iteration_but_inverse_does_not() -> None:
    layer = perturb(InvertibleResidual(D, 8, logdet="exact", tolerance=1e-12).to(DT), scale=0.5).train()
    x = x_rand()
    u0 = layer.linears[0].u.clone()
    y, _ = layer(x)
    u1 = layer.linears[0].u.clone()
    assert not torch.equal(u0, u1)
    x_back, logdet = layer.inverse_with_logdet(y)
    assert torch.equal(layer.linears[0].u, u1)
    assert (x_back - x).abs().max() < 1e-8
    # The logdet belongs to the map just inverted (no power-iteration step in between).
    torch.testing.assert_close(logdet, per_example_slogdet(layer.inverse, y), rtol=1e-9, atol=1e-9)
    assert torch.equal(layer.linears[0].u, u1)


def test_fixed_point_inverse_converges_and_reports_iterations() -> None:
    layer, y = iresnet(), 3 * x_rand(seed=3)
    x = layer.inverse(y)
    assert 2 < layer.last_iterations < layer.max_iterations
    assert (x + layer.residual(x) - y).abs().max() < 1e-12
    stingy = iresnet(max_iterations=2)
    with pytest.raises(RuntimeError, match="did not converge"):
        stingy.inverse(y)


def test_inverse_parameter_gradient_is_the_implicit_one() -> None:
    layer, y = iresnet(), x_rand(seed=3)
    weights = x_rand(seed=4)
    bias = layer.linears[0].bias
    (layer.inverse(y) * weights).sum().backward()
    step = 1e-6
    for i in range(3):
        with torch.no_grad():
            bias[i] += step
            up = (layer.inverse(y) * weights).sum()
            bias[i] -= 2 * step
            down = (layer.inverse(y) * weights).sum()
            bias[i] += step
        torch.testing.assert_close(bias.grad[i], (up - down) / (2 * step), rtol=1e-6, atol=1e-9)


def test_series_logdet_converges_to_the_exact_one_within_the_truncation_bound() -> None:
    layer, x = iresnet(), 3 * x_rand()
    exact = layer(x)[1]
    lip = torch.stack([torch.linalg.matrix_norm(w, ord=2) for w in layer.effective_weights()]).prod()
    probes = hypercube_probes(B, D)  # exact traces: only truncation error remains
    errors = []
    for terms in (1, 2, 4, 8, 16, 40):
        with torch.no_grad():
            error = (layer.series_logdet(x, terms, probes) - exact).abs().max()
        # |tr(J^k)| <= D Lip(g)^k, so the tail after n terms is at most D sum_{k>n} Lip^k / k.
        bound = D * sum(lip**k / k for k in range(terms + 1, 400))
        assert error <= bound + 1e-13
        errors.append(error.item())
    assert errors[0] > 1e-4  # one term is visibly wrong, so the comparison can fail
    assert errors[-1] < 1e-12
    assert all(a >= b for a, b in itertools.pairwise(errors[:-1]))


def test_series_forward_with_random_probes_is_close_to_exact() -> None:
    exact_layer, x = iresnet("exact"), 3 * x_rand()
    layer = iresnet("series", series_terms=20, probes=2000)
    layer.load_state_dict(exact_layer.state_dict())
    exact = exact_layer(x)[1]
    with torch.no_grad():  # no double-backward graph: much faster with this many probes
        estimates = torch.stack([layer(x)[1] for _ in range(3)])
    assert ((estimates - exact).abs() < 0.01).all()
    assert not torch.equal(estimates[0], estimates[1])  # random probes per call


def test_series_logdet_is_differentiable_like_the_exact_one() -> None:
    layer, x = iresnet(), 3 * x_rand()
    params = list(layer.parameters())
    # The last bias shifts g without changing its Jacobian, so its gradient is zero (materialised).
    exact = torch.autograd.grad(layer(x)[1].sum(), params, allow_unused=True, materialize_grads=True)
    series = layer.series_logdet(x, 40, hypercube_probes(B, D)).sum()
    series_grads = torch.autograd.grad(series, params, allow_unused=True, materialize_grads=True)
    assert exact[0].abs().max() > 1e-3
    for exact_grad, series_grad in zip(exact, series_grads, strict=True):
        torch.testing.assert_close(series_grad, exact_grad, rtol=1e-8, atol=1e-10)


def test_logdet_without_grad_mode_is_detached() -> None:
    layer = iresnet("series")
    with torch.no_grad():
        y, logdet = layer(x_rand())
    assert not y.requires_grad and not logdet.requires_grad and torch.isfinite(logdet).all()


# --- i-RevNet block -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("features", [2, 4, 5])
def test_additive_residual_swaps_halves_and_preserves_volume(features: int) -> None:
    layer = perturb(AdditiveResidual(features, 8).to(DT))
    x = x_rand(d=features)
    y, logdet = layer(x)
    half = features // 2
    assert torch.equal(y[:, : features - half], x[:, half:])  # x2 moves to the front unchanged
    assert (y[:, features - half :] - x[:, :half]).abs().max() > 1e-3  # x1 is shifted by F(x2)
    assert torch.equal(logdet, torch.zeros(B, dtype=DT))
    assert torch.equal(layer.inverse(y), x) or (layer.inverse(y) - x).abs().max() < 1e-14
    torch.testing.assert_close(per_example_slogdet(lambda v: layer(v)[0], x), logdet, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        per_example_slogdet(layer.inverse, y), layer.inverse_with_logdet(y)[1], atol=1e-12, rtol=0
    )


# --- planar and radial ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw_wu", [-1e4, -50.0, -5.0, -1.0, 0.0, 2.0, 1e3])
def test_planar_u_hat_keeps_the_map_invertible(raw_wu: float) -> None:
    layer = Planar(D).to(DT)
    with torch.no_grad():
        w = torch.tensor([0.7, -1.3, 0.4], dtype=DT)
        orthogonal = torch.tensor([1.3, 0.7, 0.0], dtype=DT)
        layer.w.copy_(w)
        layer.u.copy_(raw_wu * w / w.dot(w) + 2.0 * orthogonal)
    c = torch.dot(layer.w, layer.u_hat())
    assert c >= -1.0
    if raw_wu > -10:  # away from the singular limit c = -1 the round trip stays exact
        assert c > -1.0
        z = 3 * x_rand(seed=6)
        x, logdet = layer.inverse_with_logdet(z)
        assert (layer(x)[0] - z).abs().max() < 1e-8
        torch.testing.assert_close(logdet, per_example_slogdet(layer.inverse, z), rtol=1e-8, atol=1e-8)


def test_radial_beta_hat_stays_above_minus_alpha() -> None:
    layer = Radial(D).to(DT)
    for alpha_raw, beta_raw in itertools.product([-50.0, 0.0, 30.0], [-1e4, -3.0, 0.0, 40.0]):
        with torch.no_grad():
            layer.alpha_raw.fill_(alpha_raw)
            layer.beta_raw.fill_(beta_raw)
        alpha, beta = layer.alpha_beta()
        assert alpha > 0 and beta >= -alpha
    with torch.no_grad():
        layer.alpha_raw.fill_(0.3)
        layer.beta_raw.fill_(-6.0)  # beta close to -alpha: a strong contraction towards z0
    z = x_rand(seed=8)
    x, logdet = layer.inverse_with_logdet(z)
    assert (layer(x)[0] - z).abs().max() < 1e-8
    torch.testing.assert_close(logdet, per_example_slogdet(layer.inverse, z), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("cls", [Planar, Radial])
def test_planar_and_radial_start_random_and_seeded(cls: type[Flow]) -> None:
    a, b = cls(D, generator=torch.Generator().manual_seed(3)), cls(D, generator=torch.Generator().manual_seed(3))
    z = torch.randn(B, D)
    assert torch.equal(a.inverse(z), b.inverse(z))
    assert (a.inverse(z) - z).abs().max() > 1e-4


# --- options --------------------------------------------------------------------------------------------------------


def test_invalid_options_are_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="logdet='bogus'"):
        InvertibleResidual(D, logdet="bogus")
    with pytest.raises(ValueError, match="distribution='uniform'"):
        InvertibleResidual(D, distribution="uniform")
    with pytest.raises(ValueError, match=r"distribution='uniform'.*'rademacher', 'gaussian'"):
        hutchinson_trace(lambda v: v, (B, D), distribution="uniform")
    with pytest.raises(ValueError, match="lipschitz"):
        InvertibleResidual(D, lipschitz=1.0)


def test_eval_logdet_switches_to_exact_in_eval_mode() -> None:
    torch.manual_seed(0)
    layer = InvertibleResidual(3, 8, 1, logdet="series", series_terms=2, eval_logdet="exact").double()
    perturb(layer, 0.3)
    x = torch.randn(4, 3, dtype=torch.float64)
    exact = per_example_slogdet(lambda v: layer.eval()(v)[0], x)
    torch.testing.assert_close(layer.eval()(x)[1], exact, rtol=1e-9, atol=1e-9)
    # In training mode the two-term series is used: a different (truncated, stochastic) number.
    assert not torch.allclose(layer.train()(x)[1], exact, atol=1e-6)
    with pytest.raises(ValueError, match="eval_logdet"):
        InvertibleResidual(3, eval_logdet="approximate")
