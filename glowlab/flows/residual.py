"""Residual flows: invertible residual blocks (i-ResNet) and additive i-RevNet blocks on vectors.

Their networks live in :mod:`glowlab.flows.nn`, the trace estimator of i-ResNet's power series in
:mod:`glowlab.flows.trace`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glowlab.flows.base import Flow, check_option, sum_except_batch
from glowlab.flows.nn import SpectralNormLinear, layer_widths, mlp
from glowlab.flows.trace import PROBE_DISTRIBUTIONS, make_probes

LOGDETS = ("series", "exact")


class InvertibleResidual(Flow):
    """``y = x + g(x)`` with ``Lip(g) < 1``, inverted by fixed-point iteration.

    ``g`` is an MLP of :class:`SpectralNormLinear` layers (each of spectral norm at most
    ``lipschitz`` < 1) with ELU between them; ELU is 1-Lipschitz, so ``Lip(g) <= lipschitz ** L``
    for ``L = hidden_layers + 1`` linear layers, and ``x -> x + g(x)`` is a bijection.

    ``logdet="exact"`` computes the per-example Jacobian of ``g`` with one batched backward pass
    (``D`` vector-Jacobian products: small ``D`` only) and takes ``slogdet(I + J_g)``.
    ``logdet="series"`` truncates ``log det(I + J) = sum_k (-1)^(k+1) tr(J^k) / k`` after
    ``series_terms`` terms and estimates every trace with the same ``probes`` Hutchinson probes
    (``v^T J^k v`` by ``k`` vector-Jacobian products): cheap in ``D`` but biased by the truncation
    and noisy. The log-determinant keeps its graph whenever grad mode is on, so it can be trained.
    ``eval_logdet`` (default: as ``logdet``) is the mode in eval mode: train with the series and
    evaluate held-out likelihoods exactly when ``D`` is small.

    ``inverse`` iterates ``x <- y - g(x)`` from ``x = y`` until the largest change is below
    ``tolerance`` (floored at a few ulps of the dtype so float32 can converge); the count lands in
    ``last_iterations``. It is differentiable by the implicit function theorem: backward solves
    ``(I + J_g)^T a = grad`` by a second fixed-point iteration, so no iterate is kept in memory.
    Spectral-norm buffers advance only in ``forward`` in training mode; ``inverse`` never changes them.

    References: Behrmann et al., "Invertible Residual Networks", ICML 2019.
    """

    def __init__(
        self,
        features: int,
        hidden_features: int = 64,
        hidden_layers: int = 2,
        lipschitz: float = 0.9,
        logdet: str = "series",
        series_terms: int = 10,
        probes: int = 1,
        max_iterations: int = 100,
        tolerance: float = 1e-10,
        eval_logdet: str | None = None,
        *,
        distribution: str = "rademacher",
        power_iterations: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_option("logdet", logdet, LOGDETS)
        if eval_logdet is not None:
            check_option("eval_logdet", eval_logdet, LOGDETS)
        check_option("distribution", distribution, PROBE_DISTRIBUTIONS)
        if not 0 < lipschitz < 1:
            raise ValueError(f"lipschitz must be in (0, 1) for the block to be invertible, got {lipschitz}")
        if series_terms < 1 or probes < 1 or max_iterations < 1:
            raise ValueError("series_terms, probes and max_iterations must all be >= 1")
        self.features = features
        self.logdet, self.distribution = logdet, distribution
        self.eval_logdet = eval_logdet
        self.series_terms, self.probes = series_terms, probes
        self.max_iterations, self.tolerance = max_iterations, tolerance
        self.last_iterations = 0
        sizes = layer_widths(features, hidden_features, hidden_layers, features)
        self.linears = nn.ModuleList(
            SpectralNormLinear(a, b, lipschitz, power_iterations, generator=generator)
            for a, b in itertools.pairwise(sizes)
        )

    def converge(self, iterations: int = 200) -> list[Tensor]:
        """Converge every layer's power iteration; returns each layer's ``sigma_hat``."""
        return [layer.converge(iterations) for layer in self.linears]

    def effective_weights(self, update: bool = False) -> list[Tensor]:
        """The rescaled weight matrices ``g`` uses (``update`` advances power iteration first)."""
        return [layer.normalized_weight(update) for layer in self.linears]

    def _g(self, x: Tensor, weights: list[Tensor]) -> Tensor:
        # Weights are computed once per call and passed in, so every evaluation of g inside one
        # forward/inverse (iterations, replicated probes) uses the same function.
        for i, (layer, w) in enumerate(zip(self.linears, weights, strict=True)):
            x = F.linear(x, w, layer.bias)
            if i < len(weights) - 1:
                x = F.elu(x)
        return x

    def residual(self, x: Tensor) -> Tensor:
        """``g(x)`` with the current weights (no power-iteration update)."""
        return self._g(x, self.effective_weights())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._forward(x, update=self.training)

    def inverse_with_logdet(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = self.inverse(y)
        # No power-iteration step here: the log-determinant must belong to the map just inverted.
        return x, -self._forward(x, update=False)[1]

    def _forward(self, x: Tensor, update: bool) -> tuple[Tensor, Tensor]:
        keep_graph = torch.is_grad_enabled()
        weights = self.effective_weights(update=update)
        with torch.enable_grad():
            # The log-determinant needs derivatives with respect to x even under no_grad.
            x_in = x if keep_graph and x.requires_grad else x.detach().requires_grad_(True)
            mode = self.logdet if self.training or self.eval_logdet is None else self.eval_logdet
            if mode == "exact":
                gx, logdet = self._exact(x_in, weights, keep_graph)
            else:
                probes = make_probes(x.shape, self.probes, self.distribution, dtype=x.dtype, device=x.device)
                gx, logdet = self._series(x_in, weights, probes, self.series_terms, keep_graph)
        y = x + gx
        if not keep_graph:
            return y.detach(), logdet.detach()
        return y, logdet

    def _exact(self, x: Tensor, weights: list[Tensor], create_graph: bool) -> tuple[Tensor, Tensor]:
        b, d = x.shape
        x_rep = x.repeat(d, 1)  # (D * B, D): copy i yields row i of every example's Jacobian
        g_rep = self._g(x_rep, weights)  # (D * B, D)
        basis = torch.eye(d, dtype=x.dtype, device=x.device).repeat_interleave(b, dim=0)  # (D * B, D)
        (rows,) = torch.autograd.grad(g_rep, x_rep, basis, create_graph=create_graph)  # (D * B, D)
        jac = rows.reshape(d, b, d).transpose(0, 1)  # (B, D, D): jac[n, i, j] = dg_i/dx_j
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        # det(I + J_g) > 0 because Lip(g) < 1, so the log of |det| is the log of det.
        logdet = torch.linalg.slogdet(eye + jac)[1]
        return g_rep[:b], logdet.to(torch.promote_types(x.dtype, torch.float32))

    def _series(
        self, x: Tensor, weights: list[Tensor], probes: Tensor, terms: int, create_graph: bool
    ) -> tuple[Tensor, Tensor]:
        p, b, d = probes.shape
        x_rep = x.repeat(p, 1)  # (P * B, D): one copy of the batch per probe
        g_rep = self._g(x_rep, weights)  # (P * B, D)
        v = probes.reshape(p * b, d)  # (P * B, D)
        w = v
        logdet = x.new_zeros(b, dtype=torch.promote_types(x.dtype, torch.float32))
        for k in range(1, terms + 1):
            # w^T = v^T J^k after k vector-Jacobian products; w . v estimates tr(J^k).
            (w,) = torch.autograd.grad(g_rep, x_rep, w, retain_graph=True, create_graph=create_graph)
            trace = sum_except_batch(w * v).reshape(p, b).mean(dim=0)  # (P * B,) -> (P, B) -> (B,)
            logdet = logdet + ((-1) ** (k + 1) / k) * trace
        return g_rep[:b], logdet

    def series_logdet(self, x: Tensor, terms: int | None = None, probe_vectors: Tensor | None = None) -> Tensor:
        """The power-series log-determinant at ``x``, shape ``(B,)``, with explicit probes if given.

        ``probe_vectors`` has shape ``(P, B, D)``; passing every Rademacher sign pattern (``2^D``
        probes) makes each trace exact, which isolates the truncation error of ``terms`` terms.
        Uses the current weights without advancing power iteration.
        """
        if probe_vectors is None:
            probe_vectors = make_probes(x.shape, self.probes, self.distribution, dtype=x.dtype, device=x.device)
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            x_in = x if keep_graph and x.requires_grad else x.detach().requires_grad_(True)
            _, logdet = self._series(
                x_in, self.effective_weights(), probe_vectors, terms or self.series_terms, keep_graph
            )
        return logdet if keep_graph else logdet.detach()

    def _fixed_point(self, y: Tensor, fn: Callable[[Tensor], Tensor], what: str) -> tuple[Tensor, int]:
        """Iterate ``x <- fn(x)`` from ``y`` (no graph) until the largest change is below tolerance."""
        floor = 16 * torch.finfo(y.dtype).eps * (1.0 + y.detach().abs().max().item())
        tolerance = max(self.tolerance, floor)
        x = y.detach()
        change = math.inf
        with torch.no_grad():
            for iteration in range(1, self.max_iterations + 1):
                new = fn(x)
                change = (new - x).abs().max().item() if new.numel() else 0.0
                x = new
                if change < tolerance:
                    return x, iteration
        raise RuntimeError(
            f"InvertibleResidual {what} did not converge in max_iterations={self.max_iterations} "
            f"(last change {change:.3e}, tolerance {tolerance:.3e}); is Lip(g) < 1 (call converge())?"
        )

    def inverse(self, y: Tensor) -> Tensor:
        weights = self.effective_weights(update=False)
        frozen = [w.detach() for w in weights]
        x_star, self.last_iterations = self._fixed_point(y, lambda x: y.detach() - self._g(x, frozen), "inverse")
        # One more step carries the graph to y and the parameters; its hook turns the incoming
        # gradient into the implicit one, (I + J_g)^-T grad, which plain backprop of this step lacks.
        x = y - self._g(x_star, weights)
        if x.requires_grad:
            x.register_hook(lambda grad: self._implicit_backward(grad, x_star, frozen))
        return x

    def _implicit_backward(self, grad: Tensor, x_star: Tensor, weights: list[Tensor]) -> Tensor:
        with torch.enable_grad():
            x_leaf = x_star.detach().requires_grad_(True)
            gx = self._g(x_leaf, weights)

            def step(a: Tensor) -> Tensor:
                with torch.enable_grad():
                    (jta,) = torch.autograd.grad(gx, x_leaf, a, retain_graph=True)
                return grad - jta

            return self._fixed_point(grad, step, "backward of inverse")[0]


class AdditiveResidual(Flow):
    """The i-RevNet block on vectors: ``x = (x1, x2) -> (x2, x1 + F(x2))``, exactly invertible.

    ``x1`` is the first ``D // 2`` features and ``x2`` the rest, so for odd ``D`` the output puts the
    larger half first. ``F`` is an MLP (ELU). The map is an additive coupling followed by a swap, so
    ``|det J| = 1`` and the log-determinant is exactly 0: the block preserves volume and has no
    scaling, so a density model needs another layer (an elementwise affine, ActNorm) to change volume.

    References: Jacobsen et al., "i-RevNet: Deep Invertible Networks", ICLR 2018.
    """

    def __init__(
        self,
        features: int,
        hidden_features: int = 64,
        hidden_layers: int = 2,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if features < 2:
            raise ValueError(f"AdditiveResidual needs features >= 2 to split, got {features}")
        self.features = features
        self.split = features // 2
        layer_widths(features - self.split, hidden_features, hidden_layers, self.split)  # checks hidden_layers
        self.net = mlp(
            features - self.split,
            hidden_features,
            hidden_layers,
            self.split,
            activation="elu",
            zero_output=False,
            uniform_init=True,
            generator=generator,
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = x[:, : self.split], x[:, self.split :]
        y = torch.cat([x2, x1 + self.net(x2)], dim=1)
        return y, x.new_zeros(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32))

    def inverse(self, y: Tensor) -> Tensor:
        # The first D - D // 2 outputs are x2, unchanged; the rest are x1 shifted by F(x2).
        x2, shifted = y[:, : self.features - self.split], y[:, self.features - self.split :]
        return torch.cat([shifted - self.net(x2), x2], dim=1)

    def inverse_with_logdet(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.inverse(y), y.new_zeros(y.shape[0], dtype=torch.promote_types(y.dtype, torch.float32))
