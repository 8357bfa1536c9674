"""Continuous normalizing flows: ODE round trips, log-determinants against brute-force Jacobians of
the whole ODE map, an unbiased Hutchinson estimator, and adjoint gradients equal to direct backprop."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from helpers import perturb

from glowlab.flows.base import standard_normal_log_prob
from glowlab.flows.continuous import CNF, ODENet

# A fixed small step makes the discrete map's Jacobian (what autograd sees) agree with the integrated
# divergence to ~1e-11; adaptive steps would add derivatives of the step-size controller.
RK4 = {"solver": "rk4", "step_size": 0.01}
COARSE = {"solver": "rk4", "step_size": 0.05}
TIGHT = {"solver": "dopri5", "rtol": 1e-10, "atol": 1e-10}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Hundreds of tiny sequential solver steps: extra threads only add synchronisation (and, on a busy
    # machine, waiting for descheduled threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_cnf(features: int = 3, seed: int = 1, **kwargs) -> CNF:
    kwargs.setdefault("adjoint", False)
    # Scale 0.3 moves points by O(1) over the flow (far from the zero-initialised identity) while
    # keeping the dynamics smooth enough for a few hundred steps.
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # equal seeds give equal weights, whatever the options
        cnf = CNF(features, hidden_features=16, **kwargs)
    return perturb(cnf.double(), 0.3, seed)


def test_odenet_shapes_and_time_dependence() -> None:
    net = perturb(ODENet(3, 8, 2).double(), 0.3, 0)
    x = torch.randn(4, 3, dtype=torch.float64)
    t0, t1 = torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    assert net(t0, x).shape == (4, 3)
    assert (net(t0, x) - net(t1, x)).abs().max() > 1e-3


def test_untrained_cnf_is_identity() -> None:
    cnf = CNF(3, 8).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    z, logdet = cnf(x)
    # Up to rounding in the solver's interpolation at the end time.
    torch.testing.assert_close(z, x, rtol=0, atol=1e-14)
    torch.testing.assert_close(logdet, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("options", [{"solver": "rk4", "step_size": 0.02}, TIGHT], ids=["rk4", "dopri5"])
def test_round_trip_float64(options: dict) -> None:
    cnf = make_cnf(**options)
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        z, logdet = cnf(x)
        assert logdet.shape == (4,)
        assert (z - x).abs().max() > 0.1  # the map is far from the identity
        assert (cnf.inverse(z) - x).abs().max() < 1e-8
        w = torch.randn(4, 3, dtype=torch.float64)
        x_w, logdet_w = cnf.inverse_with_logdet(w)
        assert (cnf(x_w)[0] - w).abs().max() < 1e-8
        assert (cnf.inverse(w) - x_w).abs().max() < 1e-8
        # The two directions' log-determinants are negatives of each other.
        torch.testing.assert_close(cnf(x_w)[1], -logdet_w, rtol=1e-8, atol=1e-8)


def test_hutchinson_probe_is_fixed_during_a_solve() -> None:
    # With a Rademacher probe in 2-D, eᵀJe = tr J + e₁e₂(J₁₂ + J₂₁). A probe held for the whole solve
    # gives exactly two estimates, exact ± c, one per sign of e₁e₂; a probe redrawn at each
    # evaluation would spread them out.
    cnf = make_cnf(features=2, divergence="hutchinson", **COARSE)
    exact = make_cnf(features=2, **COARSE)
    x = torch.randn(1, 2, dtype=torch.float64)
    with torch.no_grad():
        z, estimates = cnf(x.expand(64, 2))
        z_exact, logdet = exact(x)
    torch.testing.assert_close(z, z_exact.expand(64, 2), rtol=1e-12, atol=1e-12)
    low, high = estimates.min(), estimates.max()
    assert high - low > 1e-3
    assert torch.all(torch.minimum((estimates - low).abs(), (estimates - high).abs()) < 1e-10)
    torch.testing.assert_close((low + high) / 2, logdet[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe: str) -> None:
    options = {"solver": "dopri5", "rtol": 1e-8, "atol": 1e-8}
    cnf = make_cnf(divergence="hutchinson", probe=probe, **options)
    x = torch.randn(4, 3, dtype=torch.float64)
    repeats, solves = 250, 4
    with torch.no_grad():
        exact = cnf.eval()(x)[1]
        cnf.train()
        # Each solve: (repeats * B, D) in, (repeats * B,) -> (repeats, B) log-determinants out.
        estimates = torch.stack([cnf(x.repeat(repeats, 1))[1].reshape(repeats, 4) for _ in range(solves)])
    estimates = estimates.reshape(repeats * solves, 4)  # (solves, repeats, B) -> (N, B)
    stderr = estimates.std(dim=0) / estimates.shape[0] ** 0.5
    assert torch.all(stderr > 1e-4)  # the estimator is really random
    assert torch.all((estimates.mean(dim=0) - exact).abs() < 4 * stderr)
    # Each solve draws a fresh probe.
    assert (estimates[0] - estimates[repeats]).abs().max() > 1e-6


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_adjoint_gradients_match_backprop(divergence: str) -> None:
    grads = {}
    for adjoint in (False, True):
        cnf = make_cnf(features=2, divergence=divergence, adjoint=adjoint, **TIGHT)
        x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
        torch.manual_seed(7)  # the same Hutchinson probe for both
        z, logdet = cnf(x)
        loss = -(standard_normal_log_prob(z) + logdet).mean()
        grads[adjoint] = torch.autograd.grad(loss, [x, *cnf.parameters()])
    assert all(g.abs().max() > 1e-4 for g in grads[False])
    for with_adjoint, direct in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(with_adjoint, direct, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_backprop_gradient_matches_finite_differences(divergence: str) -> None:
    # On a fixed grid the solver is a smooth map of the weights and the input, so a central
    # difference along a random direction checks every gradient, the divergence's included.
    cnf = make_cnf(features=2, divergence=divergence, **COARSE)
    params = list(cnf.parameters())
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    directions = [torch.randn_like(p) for p in [x, *params]]

    def loss() -> torch.Tensor:
        torch.manual_seed(7)  # the same probe at every evaluation
        z, logdet = cnf(x)
        return -(standard_normal_log_prob(z) + logdet).mean()

    grads = torch.autograd.grad(loss(), [x, *params])
    analytic = sum((g * d).sum() for g, d in zip(grads, directions, strict=True))
    eps, values = 1e-5, []
    with torch.no_grad():
        for sign in (1, -1):
            for p, d in zip([x, *params], directions, strict=True):
                p.add_(sign * eps * d)
            values.append(loss())
            for p, d in zip([x, *params], directions, strict=True):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert analytic.abs() > 1e-2
    torch.testing.assert_close(analytic, numeric, rtol=1e-7, atol=1e-8)


def test_eval_mode_uses_eval_divergence() -> None:
    cnf = make_cnf(divergence="hutchinson", eval_divergence="exact", **COARSE)
    reference = make_cnf(**COARSE)
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        train_logdet = cnf(x)[1]
        cnf.eval()
        torch.testing.assert_close(cnf(x)[1], reference(x)[1], rtol=1e-12, atol=1e-12)
    assert (train_logdet - reference(x)[1]).abs().max() > 1e-6


def test_sampling_under_no_grad_matches_grad_mode() -> None:
    cnf = make_cnf(adjoint=True, **COARSE)
    w = torch.randn(4, 3, dtype=torch.float64)
    x_grad, logdet_grad = cnf.inverse_with_logdet(w)
    with torch.no_grad():
        x, logdet = cnf.inverse_with_logdet(w)
    assert not x.requires_grad and not logdet.requires_grad
    assert logdet_grad.requires_grad
    torch.testing.assert_close(x, x_grad.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, logdet_grad.detach(), rtol=1e-12, atol=1e-12)
    assert cnf.nfe == 80  # 20 rk4 steps of 4 evaluations


def test_float32_defaults() -> None:
    cnf = perturb(CNF(2, 16), 0.3, 0)
    x = torch.randn(8, 2)
    z, logdet = cnf(x)
    assert z.dtype == torch.float32 and logdet.dtype == torch.float32 and logdet.shape == (8,)
    assert cnf.nfe > 0
    logdet.sum().backward()  # adjoint by default
    assert all(p.grad is not None for p in cnf.parameters())
    with torch.no_grad():
        assert (cnf.inverse(z) - x).abs().max() < 1e-3


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"divergence": "trace"}, "divergence"),
        ({"eval_divergence": "approx"}, "eval_divergence"),
        ({"probe": "uniform"}, "probe"),
        ({"solver": "rk45"}, "solver"),
        ({"solver": "rk4"}, "step_size"),
        ({"solver": "dopri5", "step_size": 0.1}, "step_size"),
        ({"solver": "euler", "step_size": -0.1}, "step_size"),
        ({"time": 0.0}, "time"),
        ({"activation": "relu"}, "activation"),
    ],
)
def test_invalid_options(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        CNF(2, **kwargs)
