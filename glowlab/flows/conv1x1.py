"""Invertible 1x1 convolutions: a learned linear mixing of channels at every pixel."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glowlab.flows.base import Flow, constant_logdet


def random_rotation(num_channels: int, generator: torch.Generator | None = None) -> Tensor:
    """A random orthogonal matrix (log|det| = 0), the Glow initialisation of the 1x1 weight."""
    q, _ = torch.linalg.qr(torch.randn(num_channels, num_channels, generator=generator))
    return q


def kernel_1x1(matrix: Tensor) -> Tensor:
    """A (C_out, C_in) matrix as the (C_out, C_in, 1, 1) kernel of a 1x1 convolution (one view)."""
    return matrix.reshape(matrix.shape[0], matrix.shape[1], 1, 1)  # (C_out, C_in) -> (C_out, C_in, 1, 1)


class InvConv1x1(Flow):
    """``y = W x`` per pixel with a dense learned ``W``; ``logdet = H·W·log|det W|`` by slogdet.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, num_channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(random_rotation(num_channels, generator))

    def matrix(self) -> tuple[Tensor, Tensor]:
        """``(W, log|det W|)``: the (C, C) weight and its log-determinant (a scalar)."""
        return self.weight, torch.linalg.slogdet(self.weight)[1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        weight, logabsdet = self.matrix()
        y = F.conv2d(x, kernel_1x1(weight))
        return y, constant_logdet(x.shape[2] * x.shape[3] * logabsdet, x)

    def inverse(self, y: Tensor) -> Tensor:
        # inv_ex, not inv: inv checks for singularity on the host, a device synchronisation that
        # invertible backprop would pay in every backward pass.
        return F.conv2d(y, kernel_1x1(torch.linalg.inv_ex(self.weight).inverse))


class LUFactorised(Flow):
    """Base for layers with a square weight ``W = P L (U + diag(sign · exp(log_s)))``.

    ``P`` is a fixed permutation, ``L`` unit lower triangular, ``U`` strictly upper triangular;
    ``log|det W| = sum(log_s)``, so the log-determinant costs O(n) instead of O(n^3), and ``W^-1``
    comes from two triangular solves. ``W`` starts as a random rotation. Subclasses apply ``W``
    (per pixel, or to vectors) and share these parameters and buffer names.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, num_features: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        p, lower, upper = torch.linalg.lu(random_rotation(num_features, generator))
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(num_features, num_features), -1))
        self.register_buffer("eye", torch.eye(num_features))
        # Not saved (derived from lower_mask): spares a transpose each time the weight is assembled.
        self.register_buffer("upper_mask", self.lower_mask.T.clone(), persistent=False)
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(s.abs().log())

    def factors(self) -> tuple[Tensor, Tensor]:
        """The unit lower factor ``L`` and the upper factor ``U + diag(sign · exp(log_s))``."""
        return lu_factors(self, self.lower, self.upper, self.sign_s, self.log_s)

    def weight(self) -> Tensor:
        """The assembled weight ``W = P L U``."""
        lower, upper = self.factors()
        return self.p @ lower @ upper

    def matrix(self) -> tuple[Tensor, Tensor]:
        """``(W, log|det W|)``: the assembled weight and ``sum(log_s)`` (a scalar)."""
        return self.weight(), self.log_s.sum()

    def weight_inverse(self) -> Tensor:
        """``W^-1 = U^-1 L^-1 P^T``, by two triangular solves rather than a general inverse."""
        lower, upper = self.factors()
        lower_inv_pt = torch.linalg.solve_triangular(lower, self.p.T, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, lower_inv_pt, upper=True)


def lu_factors(
    layer: LUFactorised, lower: Tensor, upper: Tensor, sign_s: Tensor, log_s: Tensor
) -> tuple[Tensor, Tensor]:
    """``L`` and ``U`` from the LU parameters of ``layer``, or of several such layers stacked.

    ``lower`` and ``upper`` are (..., C, C), ``sign_s`` and ``log_s`` (..., C); the masks and the
    identity come from ``layer`` (the same for every layer of that size).
    """
    lower = lower * layer.lower_mask + layer.eye
    upper = upper * layer.upper_mask + torch.diag_embed(sign_s * log_s.exp())
    return lower, upper


def mixing_matrices(layers: Sequence[InvConv1x1 | LUFactorised]) -> tuple[Tensor, Tensor]:
    """The weights of several 1x1 convolutions of one size at once: ``(W, sum of log|det W|)``.

    ``W`` is (K, C, C) for K layers. The K small matrix products run as one batched product, which
    is what lets a level of Glow steps assemble all its weights in a few operators (see
    :class:`glowlab.models.multiscale.Level`). The layers must all be of one class.
    """
    first = layers[0]
    if isinstance(first, LUFactorised):
        lower, upper = lu_factors(
            first,
            torch.stack([m.lower for m in layers]),
            torch.stack([m.upper for m in layers]),
            torch.stack([m.sign_s for m in layers]),
            log_s := torch.stack([m.log_s for m in layers]),
        )
        return torch.stack([m.p for m in layers]) @ lower @ upper, log_s.sum()
    weight = torch.stack([m.weight for m in layers])  # (K, C, C)
    return weight, torch.linalg.slogdet(weight)[1].sum()


class InvConv1x1LU(LUFactorised):
    """1x1 convolution with the LU-factorised weight of :class:`LUFactorised`.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, num_channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__(num_channels, generator)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        weight, logabsdet = self.matrix()
        y = F.conv2d(x, kernel_1x1(weight))
        return y, constant_logdet(x.shape[2] * x.shape[3] * logabsdet, x)

    def inverse(self, y: Tensor) -> Tensor:
        return F.conv2d(y, kernel_1x1(self.weight_inverse()))
