"""The contract every flow layer follows, and a composite of layers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")


class Flow(nn.Module):
    """A bijection with a tractable log-determinant.

    ``forward(x) -> (y, logdet)`` maps data towards the latent space (the normalizing direction);
    ``logdet`` has shape ``(B,)`` and is ``log|det dy/dx|`` per example. ``inverse(y) -> x``
    undoes ``forward`` exactly. ``inverse_with_logdet(y) -> (x, logdet)`` is the sampling direction
    with ``log|det dx/dy|``, which reverse-KL training and ``sample_with_log_prob`` need: the
    default inverts and re-runs ``forward``; layers whose inverse is the cheap direction (IAF,
    planar, radial, continuous flows) compute it in that one pass instead.

    Conditioning is part of the contract: a layer with ``conditional = True`` takes a ``context``
    (a class label, for example) as a second argument of all three methods, ``None`` when there is
    none. Containers (:class:`FlowSequence`) are conditional and hand the context to the layers
    that are; every other layer is a function of ``x`` alone, and may ignore the context.

    References: Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.
    """

    conditional = False

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse_with_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dy|)`` with ``x = inverse(y)``; the log-determinant has shape ``(B,)``."""
        if self.conditional:
            x = self.inverse(y, context)
            return x, -self.forward(x, context)[1]
        x = self.inverse(y)
        return x, -self.forward(x)[1]


def run_forward(layer: Flow, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``layer(x)``, with ``context`` when the layer is conditional."""
    return layer(x, context) if layer.conditional else layer(x)


def run_inverse(layer: Flow, y: Tensor, context: Tensor | None = None) -> Tensor:
    """``layer.inverse(y)``, with ``context`` when the layer is conditional."""
    return layer.inverse(y, context) if layer.conditional else layer.inverse(y)


class FlowSequence(Flow):
    """Layers applied in order; the log-determinants add up. A context reaches the conditional layers.

    References: Dinh et al., "NICE: Non-linear Independent Components Estimation", 2014.
    """

    conditional = True

    def __init__(self, layers: Iterable[Flow]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return chain_forward(self.layers, x, context)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return chain_inverse(self.layers, y, context)

    def inverse_with_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = None
        for layer in reversed(self.layers):
            y, ld = layer.inverse_with_logdet(y, context) if layer.conditional else layer.inverse_with_logdet(y)
            logdet = ld if logdet is None else logdet + ld
        return y, _zero_if_none(logdet, y)


def chain_forward(layers: Iterable[Flow], x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``layers`` applied in order, log-determinants summed (in at least float32)."""
    # Every layer's log-determinant is already (B,) in at least float32 (the contract), so the sum
    # starts from the first one rather than from a tensor of zeros: one operator less per layer.
    logdet = None
    for layer in layers:
        x, ld = run_forward(layer, x, context)
        logdet = ld if logdet is None else logdet + ld
    return x, _zero_if_none(logdet, x)


def _zero_if_none(logdet: Tensor | None, x: Tensor) -> Tensor:
    return x.new_zeros(x.shape[0], dtype=_accumulation_dtype(x.dtype)) if logdet is None else logdet


def chain_inverse(layers: Sequence[Flow], y: Tensor, context: Tensor | None = None) -> Tensor:
    """Inverse of :func:`chain_forward`: the layers' inverses in reverse order."""
    for layer in reversed(layers):
        y = run_inverse(layer, y, context)
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


def choose(name: str, value: str, registry: Mapping[str, T]) -> T:
    """The entry of ``registry`` called ``value``; a ``ValueError`` naming the option ``name`` otherwise.

    Every named choice of glowlab (couplings, permutations, architectures, vector families) is a
    registry of this kind: a dict from the option's value to what builds it.
    """
    check_option(name, value, tuple(registry))
    return registry[value]


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
