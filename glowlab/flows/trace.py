"""Stochastic trace estimation: the probes and Hutchinson's estimator.

Residual flows estimate the traces of their power series with it; continuous flows the
divergence of their dynamics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from glowlab.flows.base import check_option, sum_except_batch

PROBE_DISTRIBUTIONS = ("rademacher", "gaussian")


def make_probes(
    shape: Sequence[int],
    probes: int = 1,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``probes`` independent probe vectors of ``shape``, stacked: shape ``(probes, *shape)``.

    Every entry has mean 0 and variance 1 and entries are independent, so ``E[v v^T] = I``.
    Rademacher probes (entries ±1) give the lower-variance trace estimate; Gaussian probes are the
    classic choice. With ``generator`` the draw happens on the generator's device, then moves.
    """
    check_option("distribution", distribution, PROBE_DISTRIBUTIONS)
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    dtype = dtype or torch.get_default_dtype()
    size = (probes, *shape)
    draw_device = generator.device if generator is not None else device
    if distribution == "rademacher":
        v = torch.randint(0, 2, size, generator=generator, device=draw_device).to(dtype) * 2 - 1
    else:
        v = torch.randn(size, generator=generator, device=draw_device, dtype=dtype)
    return v.to(device) if device is not None else v


def hutchinson_samples(
    matvec: Callable[[Tensor], Tensor],
    shape: Sequence[int],
    probes: int = 1,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """One trace estimate ``v^T A v`` per probe and example: shape ``(probes, B)``.

    ``matvec`` receives all probes at once, shape ``(probes, *shape)`` with ``shape = (B, ...)``,
    and returns ``A v`` for each (per example ``A``), same shape. ``v^T A`` (a vector-Jacobian
    product) works as well, since ``v^T A v`` is the same number either way.
    """
    v = make_probes(shape, probes, distribution, generator, dtype=dtype, device=device)  # (P, B, ...)
    av = matvec(v)  # (P, B, ...)
    flat = (v * av).reshape(probes * shape[0], -1)  # (P * B, D)
    return sum_except_batch(flat).reshape(probes, shape[0])  # (P, B)


def hutchinson_trace(matvec: Callable[[Tensor], Tensor], shape: Sequence[int], *args: Any, **kwargs: Any) -> Tensor:
    """Unbiased estimate of ``tr(A)`` per example, shape ``(B,)``: the mean of ``v^T A v`` over probes.

    Unbiased because ``E[v^T A v] = tr(A E[v v^T]) = tr(A)``; the variance falls as ``1 / probes``.
    Takes the arguments of :func:`hutchinson_samples` (``probes``, ``distribution``, ``generator``,
    ``dtype``, ``device``), whose ``matvec`` contract it shares (all probes at once).

    References: Hutchinson, "A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines", Communications in Statistics - Simulation and Computation 1990.
    """
    return hutchinson_samples(matvec, shape, *args, **kwargs).mean(dim=0)
