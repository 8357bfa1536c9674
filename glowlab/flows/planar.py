"""Planar and radial flows: the sampling map ``z -> x`` is closed form, its inverse is solved."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glowlab.flows.base import Flow


def _logdet_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _sech2(a: Tensor) -> Tensor:
    # 1 - tanh^2 cancels to 0 long before sech^2 underflows; 1 / cosh^2 keeps relative precision.
    return torch.cosh(a).pow(-2)


class Planar(Flow):
    """Sampling map ``x = z + u_hat · tanh(w^T z + b)``; ``forward`` solves it for ``z``.

    ``u_hat = u + (m(w^T u) - w^T u) w / |w|^2`` with ``m(s) = -1 + softplus(s)`` makes
    ``w^T u_hat = m(w^T u) >= -1``, which keeps the map invertible for any raw ``u`` and ``w``.
    ``inverse_with_logdet`` (the natural, one-pass direction) returns
    ``log|1 + (w^T u_hat) tanh'(w^T z + b)|``. ``forward`` projects onto ``w``: with ``a = w^T z``,
    ``w^T x = a + c tanh(a + b)`` (``c = w^T u_hat``) is increasing in ``a`` and ``a`` lies within
    ``|c|`` of ``w^T x``, so bisection on that bracket for a fixed number of steps (enough to reach
    the dtype's precision) finds ``a``; then ``z = x - u_hat tanh(a + b)``. Gradients through the
    solve come from the implicit function theorem, not from the bisection steps.

    References: Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.
    """

    def __init__(self, features: int, *, init_scale: float = 0.1, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.features = features
        self.w = nn.Parameter(init_scale * torch.randn(features, generator=generator))
        self.u = nn.Parameter(init_scale * torch.randn(features, generator=generator))
        self.b = nn.Parameter(init_scale * torch.randn((), generator=generator))

    def u_hat(self) -> Tensor:
        """The constrained ``u``, with ``w^T u_hat >= -1``."""
        wu = torch.dot(self.w, self.u)
        w_norm2 = torch.dot(self.w, self.w).clamp_min(torch.finfo(self.w.dtype).tiny)
        return self.u + ((F.softplus(wu) - 1.0 - wu) / w_norm2) * self.w

    def inverse_with_logdet(self, z: Tensor) -> tuple[Tensor, Tensor]:
        u_hat = self.u_hat()
        pre = z @ self.w + self.b  # (B,)
        x = z + torch.tanh(pre)[:, None] * u_hat
        logdet = torch.log1p(torch.dot(self.w, u_hat) * _sech2(pre))
        return x, logdet.to(_logdet_dtype(z))

    def inverse(self, z: Tensor) -> Tensor:
        return self.inverse_with_logdet(z)[0]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u_hat = self.u_hat()
        c = torch.dot(self.w, u_hat)
        target = x @ self.w  # (B,)
        a = self._solve(target, c)
        z = x - torch.tanh(a + self.b)[:, None] * u_hat
        logdet = -torch.log1p(c * _sech2(a + self.b))
        return z, logdet.to(_logdet_dtype(x))

    def _solve(self, target: Tensor, c: Tensor) -> Tensor:
        """The root ``a`` of ``a + c tanh(a + b) = target``, differentiable in ``target``, ``c``, ``b``."""
        with torch.no_grad():
            c0, b0, t0 = c.detach(), self.b.detach(), target.detach()
            width = 2.0 * abs(c0.item())
            # Halving a bracket of this width down to a quarter ulp at |a| ~ 1 (the ulp itself for
            # larger |a|, where the midpoint stops moving) needs this many steps.
            mantissa_bits = round(-math.log2(torch.finfo(t0.dtype).eps))
            steps = mantissa_bits + 3 + max(0, math.ceil(math.log2(width))) if width > 0 else 0
            lo, hi = t0 - c0.abs(), t0 + c0.abs()
            for _ in range(steps):
                mid = 0.5 * (lo + hi)
                above = mid + c0 * torch.tanh(mid + b0) > t0
                hi = torch.where(above, mid, hi)
                lo = torch.where(above, lo, mid)
            root = 0.5 * (lo + hi)
        # Value exactly the root; first derivatives those of the implicit function da = -dF / F_a.
        residual = target - root - c * torch.tanh(root + self.b)
        # The slope is >= 0; the clamp only matters where the map is singular (c = -1 at a = -b).
        slope = (1.0 + c * _sech2(root + self.b)).clamp_min(torch.finfo(root.dtype).tiny)
        return root + (residual - residual.detach()) / slope


class Radial(Flow):
    """Sampling map ``x = z + beta_hat · h(r) · (z - z0)`` with ``h = 1 / (alpha + r)``, ``r = |z - z0|``.

    ``alpha = softplus(.) > 0`` and ``beta_hat = -alpha + softplus(beta) >= -alpha`` keep the map
    invertible. Its log-determinant is ``(D - 1) log(1 + beta h) + log(1 + beta h + beta h'(r) r)``,
    where the last factor simplifies to ``1 + alpha beta / (alpha + r)^2``. ``forward`` recovers
    ``r`` from ``R = |x - z0| = r (1 + beta / (alpha + r))``, i.e. the non-negative root of
    ``r^2 + (alpha + beta - R) r - alpha R = 0``, in the cancellation-free form, then
    ``z = z0 + (x - z0) (alpha + r) / (alpha + beta + r)``.

    References: Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.
    """

    def __init__(self, features: int, *, init_scale: float = 0.1, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.features = features
        self.z0 = nn.Parameter(init_scale * torch.randn(features, generator=generator))
        self.alpha_raw = nn.Parameter(init_scale * torch.randn((), generator=generator))
        self.beta_raw = nn.Parameter(init_scale * torch.randn((), generator=generator))

    def alpha_beta(self) -> tuple[Tensor, Tensor]:
        """``(alpha, beta_hat)`` with ``alpha > 0`` and ``beta_hat >= -alpha``."""
        alpha = F.softplus(self.alpha_raw)
        return alpha, F.softplus(self.beta_raw) - alpha

    def _logdet(self, r: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
        h = 1.0 / (alpha + r)
        return (self.features - 1) * torch.log1p(beta * h) + torch.log1p(alpha * beta * h * h)

    def inverse_with_logdet(self, z: Tensor) -> tuple[Tensor, Tensor]:
        alpha, beta = self.alpha_beta()
        d = z - self.z0
        r = torch.linalg.vector_norm(d, dim=1)  # (B,)
        x = z + (beta / (alpha + r))[:, None] * d
        return x, self._logdet(r, alpha, beta).to(_logdet_dtype(z))

    def inverse(self, z: Tensor) -> Tensor:
        return self.inverse_with_logdet(z)[0]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        alpha, beta = self.alpha_beta()
        d = x - self.z0
        big_r = torch.linalg.vector_norm(d, dim=1)  # (B,)
        p = alpha + beta - big_r
        disc = torch.sqrt(p * p + 4.0 * alpha * big_r)
        # The two quadratic-formula forms of the same root: each avoids the other's cancellation.
        # Both stay finite everywhere so torch.where's unused branch cannot poison gradients.
        tiny = torch.finfo(x.dtype).tiny
        r = torch.where(p >= 0, 2.0 * alpha * big_r / (p.abs() + disc).clamp_min(tiny), 0.5 * (disc + p.abs()))
        z = self.z0 + ((alpha + r) / (alpha + beta + r).clamp_min(tiny))[:, None] * d
        return z, -self._logdet(r, alpha, beta).to(_logdet_dtype(x))
