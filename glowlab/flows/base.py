"""The contract every flow layer follows, and a composite of layers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn


class Flow(nn.Module):
    """A bijection with a tractable log-determinant.

    ``forward(x) -> (y, logdet)`` maps data towards the latent space (the normalizing direction);
    ``logdet`` has shape ``(B,)`` and is ``log|det dy/dx|`` per example. ``inverse(y) -> x``
    undoes ``forward`` exactly. ``inverse_with_logdet(y) -> (x, logdet)`` is the sampling direction
    with ``log|det dx/dy|``, which reverse-KL training and ``sample_with_log_prob`` need: the
    default inverts and re-runs ``forward``; layers whose inverse is the cheap direction (IAF,
    planar, radial, continuous flows) compute it in that one pass instead.

    References: Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse_with_logdet(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dy|)`` with ``x = inverse(y)``; the log-determinant has shape ``(B,)``."""
        x = self.inverse(y)
        return x, -self.forward(x)[1]


class FlowSequence(Flow):
    """Layers applied in order; the log-determinants add up.

    References: Dinh et al., "NICE: Non-linear Independent Components Estimation", 2014.
    """

    def __init__(self, layers: Iterable[Flow]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return chain_forward(self.layers, x)

    def inverse(self, y: Tensor) -> Tensor:
        return chain_inverse(self.layers, y)

    def inverse_with_logdet(self, y: Tensor) -> tuple[Tensor, Tensor]:
        logdet = None
        for layer in reversed(self.layers):
            y, ld = layer.inverse_with_logdet(y)
            logdet = ld if logdet is None else logdet + ld
        return y, _zero_if_none(logdet, y)


def chain_forward(layers: Iterable[Flow], x: Tensor) -> tuple[Tensor, Tensor]:
    """``layers`` applied in order, log-determinants summed (in at least float32)."""
    # Every layer's log-determinant is already (B,) in at least float32 (the contract), so the sum
    # starts from the first one rather than from a tensor of zeros: one operator less per layer.
    logdet = None
    for layer in layers:
        x, ld = layer(x)
        logdet = ld if logdet is None else logdet + ld
    return x, _zero_if_none(logdet, x)


def _zero_if_none(logdet: Tensor | None, x: Tensor) -> Tensor:
    return x.new_zeros(x.shape[0], dtype=_accumulation_dtype(x.dtype)) if logdet is None else logdet


def chain_inverse(layers: Sequence[Flow], y: Tensor) -> Tensor:
    """Inverse of :func:`chain_forward`: the layers' inverses in reverse order."""
    for layer in reversed(layers):
        y = layer.inverse(y)
    return y


# Log-determinants and log-densities are sums over many terms: never accumulate them in 16 bits.
# A table rather than torch.promote_types, which is a dispatched operator: the training step asks
# this about a hundred times.
_ACCUMULATION_DTYPES = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    found = _ACCUMULATION_DTYPES.get(dtype)
    return found if found is not None else torch.promote_types(dtype, torch.float32)


def check_option(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the option ``name`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum over every dimension but the first: a per-example total of shape ``(B,)``, in >= float32."""
    # Summing over the dimensions in place, not over a (B, D) reshape: the reshape of a channels-last
    # tensor would be a copy.
    if x.dim() == 1:  # already one value per example (sum over no dimension would sum them all)
        return x.to(_accumulation_dtype(x.dtype))
    return x.sum(dim=tuple(range(1, x.dim())), dtype=_accumulation_dtype(x.dtype))


def constant_logdet(value: Tensor, x: Tensor) -> Tensor:
    """Broadcast a data-independent log-determinant (a scalar) to shape ``(B,)``."""
    return value.expand(x.shape[0]).to(_accumulation_dtype(x.dtype))


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """Log-density of ``z`` under N(0, I), summed per example: shape ``(B,)``."""
    z = z.to(_accumulation_dtype(z.dtype))
    # The constant is added per example, after the sum: one full-size operator less.
    return sum_except_batch(z * z) * -0.5 - 0.5 * math.log(2 * math.pi) * math.prod(z.shape[1:])
