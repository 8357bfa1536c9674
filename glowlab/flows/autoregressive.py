"""Masked and inverse autoregressive flows: elementwise transformers conditioned by a MADE."""

from __future__ import annotations

import torch
from torch import Tensor

from glowlab.flows.base import Flow, check_option, sum_except_batch
from glowlab.flows.elementwise import apply_transformer, check_spline_options, transformer_params
from glowlab.flows.made import MADE, ORDERS

AUTOREGRESSIVE_TRANSFORMERS = ("affine", "spline")


class Autoregressive(Flow):
    """``v_i = tau(u_i; c(u_<i))`` with a MADE conditioner ``c``: shared by :class:`MAF` and :class:`IAF`.

    ``one_pass(u)`` computes ``v`` and ``log|det dv/du|`` with a single MADE evaluation;
    ``sequential(v)`` inverts it in D evaluations (after the k-th, the first k dimensions in the
    order are exact, and the last pass sees exact conditioning for all of them, so its
    log-derivatives are exact too). Subclasses decide which one is the forward direction.
    The affine transformer is ``u * exp(s) + m`` with ``s`` soft-clamped to (-3, 3); the spline is a
    rational-quadratic spline on ``[-bound, bound]`` with identity tails. The MADE's zero-initialised
    output makes both start as the identity.

    References: Papamakarios et al., "Masked Autoregressive Flow for Density Estimation", NeurIPS 2017.
    """

    def __init__(
        self,
        features: int,
        hidden_features: int = 64,
        hidden_layers: int = 2,
        transformer: str = "affine",
        bins: int = 8,
        bound: float = 3.0,
        order: str = "natural",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_option("transformer", transformer, AUTOREGRESSIVE_TRANSFORMERS)
        check_option("order", order, ORDERS)
        if transformer == "spline":
            check_spline_options(bins, bound)
        self.features = features
        self.transformer = transformer
        self.order = order
        self.bound = bound
        self.made = MADE(
            features, hidden_features, hidden_layers, transformer_params(transformer, bins), order, generator
        )

    def one_pass(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``v = tau(u; c(u))`` and ``log|det dv/du|`` (B,), with one conditioner evaluation."""
        v, log_derivative = apply_transformer(self.transformer, u, self.made(u), bound=self.bound)
        return v, sum_except_batch(log_derivative)

    def sequential(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """The inverse of :meth:`one_pass`: ``u`` and ``log|det du/dv|`` (B,), in D evaluations."""
        u = v.new_zeros(v.shape)
        for _ in range(self.features):
            u, log_derivative = apply_transformer(self.transformer, v, self.made(u), inverse=True, bound=self.bound)
        return u, sum_except_batch(log_derivative)


class MAF(Autoregressive):
    """Masked autoregressive flow: ``z_i = tau(x_i; c(x_<i))``.

    Density evaluation (``forward``) is one MADE pass; ``inverse`` (sampling) takes D passes.

    References: Papamakarios et al., "Masked Autoregressive Flow for Density Estimation", NeurIPS 2017.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.one_pass(x)

    def inverse(self, y: Tensor) -> Tensor:
        return self.sequential(y)[0]

    def inverse_with_logdet(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.sequential(y)


class IAF(Autoregressive):
    """Inverse autoregressive flow: the sampling direction ``x_i = tau(z_i; c(z_<i))`` is one pass.

    ``inverse`` and ``inverse_with_logdet`` (sampling, reverse-KL training) take one MADE pass;
    ``forward`` (density of given data) takes D. Same parameters as :class:`MAF`: with one state
    dict, ``IAF.forward == MAF.inverse`` and ``IAF.inverse == MAF.forward``.

    References: Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow", NeurIPS 2016.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.sequential(x)

    def inverse(self, y: Tensor) -> Tensor:
        return self.one_pass(y)[0]

    def inverse_with_logdet(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.one_pass(y)
