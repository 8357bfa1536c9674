"""Continuous normalizing flows: the bijection is the time-``T`` map of a learned ODE.

``dx/dt = f(t, x)`` carries data ``x(0) = x`` to the latent ``z = x(T)``. By the instantaneous
change of variables, ``d/dt log|det dx(t)/dx(0)| = tr(df/dx)``, so the log-determinant is
integrated alongside the state. The trace is either exact (``D`` backward passes) or the
Hutchinson estimate ``eᵀ (df/dx) e`` with a random probe ``e`` (one backward pass, unbiased).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from glowlab.flows.base import Flow, check_option
from glowlab.flows.nn import layer_widths
from glowlab.flows.trace import PROBE_DISTRIBUTIONS, make_probes

DIVERGENCES = ("exact", "hutchinson")
ACTIVATIONS = ("tanh", "softplus")
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_STEP_SOLVERS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
SOLVERS = ADAPTIVE_SOLVERS + FIXED_STEP_SOLVERS


class ODENet(nn.Module):
    """Dynamics ``f(t, x) -> dx/dt``: an MLP whose every linear layer also sees the time ``t``.

    The nonlinearity is smooth (``tanh`` or ``softplus``) because the divergence differentiates
    ``f`` and training differentiates the divergence again. The output layer starts at zero, so an
    untrained CNF is the identity (as Glow's zero-initialised couplings are).

    References: Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
    Generative Models", ICLR 2019.
    """

    def __init__(
        self, features: int, hidden_features: int = 64, hidden_layers: int = 2, activation: str = "tanh"
    ) -> None:
        super().__init__()
        check_option("activation", activation, ACTIVATIONS)
        widths = layer_widths(features, hidden_features, hidden_layers, features)[:-1]
        # +1 input for the time: concatenating t to every layer lets each layer's map vary in time.
        self.linears = nn.ModuleList(nn.Linear(w_in + 1, w_out) for w_in, w_out in itertools.pairwise(widths))
        self.output = nn.Linear(hidden_features + 1, features)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)
        self.activation = torch.tanh if activation == "tanh" else nn.functional.softplus

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = t.to(x).expand(x.shape[0], 1)  # () -> (B, 1)
        h = x
        for linear in self.linears:
            h = self.activation(linear(torch.cat([h, tt], dim=1)))  # (B, W + 1) -> (B, W)
        return self.output(torch.cat([h, tt], dim=1))  # (B, W + 1) -> (B, D)


class _Dynamics(nn.Module):
    """One solve's right-hand side: ``x -> f`` or ``(x, logdet) -> (f, tr(df/dx))``.

    A fresh instance per solve holds that solve's Hutchinson probe fixed for the whole integration,
    including the adjoint's backward integration, which runs later and may interleave with other
    solves of the same CNF; it also counts function evaluations.
    """

    def __init__(self, net: ODENet, divergence: str | None, probe: Tensor | None) -> None:
        super().__init__()
        self.net = net
        self.divergence = divergence
        self.probe = probe
        self.nfe = 0

    def forward(self, t: Tensor, state: Tensor | tuple[Tensor, Tensor]) -> Tensor | tuple[Tensor, Tensor]:
        self.nfe += 1
        if self.divergence is None:
            return self.net(t, state)
        x = state[0]
        # Gradients of the divergence are needed only when the caller differentiates this call:
        # direct backprop through the solver, or the adjoint's vector-Jacobian products.
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            # Without an outer graph, start a local one at x. (Under no_grad, x can still claim
            # requires_grad, e.g. inside the adjoint's forward solve, without being in any graph.)
            if not (create_graph and x.requires_grad):
                x = x.detach().requires_grad_(True)
            dx = self.net(t, x)
            div = self._divergence(dx, x, create_graph)
        if not create_graph:
            dx, div = dx.detach(), div.detach()
        return dx, div

    def _divergence(self, dx: Tensor, x: Tensor, create_graph: bool) -> Tensor:
        if self.divergence == "hutchinson":
            # Examples are independent, so one vector-Jacobian product gives eᵀJ for every example.
            (e_jac,) = torch.autograd.grad(dx, x, self.probe, create_graph=create_graph)
            return (e_jac * self.probe).sum(dim=1)
        diagonal = []
        for i in range(x.shape[1]):
            (row,) = torch.autograd.grad(dx[:, i].sum(), x, create_graph=create_graph, retain_graph=True)
            diagonal.append(row[:, i])
        return torch.stack(diagonal, dim=1).sum(dim=1)  # D x (B,) -> (B, D) -> (B,)


class CNF(Flow):
    """Continuous normalizing flow on ``(B, D)``: ``z = x(T)`` for ``dx/dt = f(t, x)``, ``x(0) = x``.

    ``forward`` integrates ``(x, logdet)`` from 0 to ``time`` with ``d logdet/dt = tr(df/dx)``, so
    ``logdet = log|det dz/dx|``; ``inverse_with_logdet`` integrates the same system from ``time``
    back to 0, giving ``log|det dx/dz|``; ``inverse`` integrates ``x`` alone.

    Options:
        divergence: trace estimator in training mode, ``"exact"`` (D backward passes per
            evaluation) or ``"hutchinson"`` (one, with a probe drawn once per solve).
        eval_divergence: the estimator in eval mode; ``"exact"`` gives deterministic likelihoods.
        probe: Hutchinson probe distribution, ``"rademacher"`` (lower variance) or ``"gaussian"``.
        adjoint: backpropagate with the adjoint ODE (memory independent of the number of solver
            steps) instead of through the solver's operations.
        solver, rtol, atol: torchdiffeq method and tolerances (tolerances unused by fixed-step
            solvers); fixed-step solvers need ``step_size``, adaptive ones refuse it.

    ``nfe`` is the number of dynamics evaluations of the last forward/inverse solve (not counting
    the adjoint's backward solve).

    References: Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018; Grathwohl et
    al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models", ICLR 2019.
    """

    def __init__(
        self,
        features: int,
        hidden_features: int = 64,
        hidden_layers: int = 2,
        time: float = 1.0,
        divergence: str = "exact",
        eval_divergence: str = "exact",
        adjoint: bool = True,
        solver: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        step_size: float | None = None,
        probe: str = "rademacher",
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        check_option("divergence", divergence, DIVERGENCES)
        check_option("eval_divergence", eval_divergence, DIVERGENCES)
        check_option("probe", probe, PROBE_DISTRIBUTIONS)
        check_option("solver", solver, SOLVERS)
        if solver in FIXED_STEP_SOLVERS and step_size is None:
            raise ValueError(f"step_size is required by the fixed-step solver {solver!r}")
        if solver in ADAPTIVE_SOLVERS and step_size is not None:
            raise ValueError(f"step_size applies only to fixed-step solvers {FIXED_STEP_SOLVERS}, not {solver!r}")
        if step_size is not None and step_size <= 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
        if time <= 0:
            raise ValueError(f"time must be positive, got {time}")
        self.net = ODENet(features, hidden_features, hidden_layers, activation)
        self.time = time
        self.divergence = divergence
        self.eval_divergence = eval_divergence
        self.probe = probe
        self.adjoint = adjoint
        self.solver = solver
        self.rtol = rtol
        self.atol = atol
        self.step_size = step_size
        self.nfe = 0

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._solve_with_logdet(x, 0.0, self.time)

    def inverse(self, y: Tensor) -> Tensor:
        dynamics = _Dynamics(self.net, None, None)
        return self._integrate(dynamics, y, self.time, 0.0)

    def inverse_with_logdet(self, y: Tensor) -> tuple[Tensor, Tensor]:
        # Integrating d logdet/dt = tr(df/dx) backwards from 0 yields -∫ tr = log|det dx/dz| directly.
        return self._solve_with_logdet(y, self.time, 0.0)

    def _solve_with_logdet(self, x: Tensor, t0: float, t1: float) -> tuple[Tensor, Tensor]:
        divergence = self.divergence if self.training else self.eval_divergence
        probe = None
        if divergence == "hutchinson":  # one probe for the whole solve
            probe = make_probes(x.shape, 1, self.probe, dtype=x.dtype, device=x.device)[0]
        dynamics = _Dynamics(self.net, divergence, probe)
        logdet0 = x.new_zeros(x.shape[0])
        out, logdet = self._integrate(dynamics, (x, logdet0), t0, t1)
        return out, logdet.to(torch.promote_types(x.dtype, torch.float32))

    def _integrate(
        self, dynamics: _Dynamics, state: Tensor | tuple[Tensor, Tensor], t0: float, t1: float
    ) -> Tensor | tuple[Tensor, ...]:
        ref = state if isinstance(state, Tensor) else state[0]
        times = torch.tensor([t0, t1], dtype=ref.dtype, device=ref.device)
        options = {} if self.step_size is None else {"step_size": self.step_size}
        kwargs = {"rtol": self.rtol, "atol": self.atol, "method": self.solver, "options": options}
        params = tuple(p for p in self.net.parameters() if p.requires_grad)
        # Imported here, not at module level: torchdiffeq loads SciPy (and its BLAS thread pool), which
        # every process importing glowlab.flows would otherwise carry into forked data-loader workers.
        from torchdiffeq import odeint, odeint_adjoint

        # Without gradients there is nothing for the adjoint to do: a plain solve is cheaper.
        if self.adjoint and torch.is_grad_enabled():
            solution = odeint_adjoint(dynamics, state, times, adjoint_params=params, **kwargs)
        else:
            solution = odeint(dynamics, state, times, **kwargs)
        self.nfe = dynamics.nfe
        if isinstance(solution, Tensor):
            return solution[-1]  # (2, B, D): the state at t0 and t1
        return tuple(s[-1] for s in solution)
