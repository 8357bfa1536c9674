"""Invertible 1x1 convolutions: a learned linear mixing of channels at every pixel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glowlab.flows.base import Flow, constant_logdet


def random_rotation(num_channels: int, generator: torch.Generator | None = None) -> Tensor:
    """A random orthogonal matrix (log|det| = 0), the Glow initialisation of the 1x1 weight."""
    q, _ = torch.linalg.qr(torch.randn(num_channels, num_channels, generator=generator))
    return q


class InvConv1x1(Flow):
    """``y = W x`` per pixel with a dense learned ``W``; ``logdet = H·W·log|det W|`` by slogdet.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, num_channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(random_rotation(num_channels, generator))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = F.conv2d(x, self.weight[:, :, None, None])  # (C, C) -> (C, C, 1, 1) kernel
        logdet = constant_logdet(x.shape[2] * x.shape[3] * torch.linalg.slogdet(self.weight)[1], x)
        return y, logdet

    def inverse(self, y: Tensor) -> Tensor:
        return F.conv2d(y, torch.linalg.inv(self.weight)[:, :, None, None])  # (C, C, 1, 1) kernel


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
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(s.abs().log())

    def factors(self) -> tuple[Tensor, Tensor]:
        """The unit lower factor ``L`` and the upper factor ``U + diag(sign · exp(log_s))``."""
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return lower, upper

    def weight(self) -> Tensor:
        """The assembled weight ``W = P L U``."""
        lower, upper = self.factors()
        return self.p @ lower @ upper

    def weight_inverse(self) -> Tensor:
        """``W^-1 = U^-1 L^-1 P^T``, by two triangular solves rather than a general inverse."""
        lower, upper = self.factors()
        lower_inv_pt = torch.linalg.solve_triangular(lower, self.p.T, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, lower_inv_pt, upper=True)


class InvConv1x1LU(LUFactorised):
    """1x1 convolution with the LU-factorised weight of :class:`LUFactorised`.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, num_channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__(num_channels, generator)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = F.conv2d(x, self.weight()[:, :, None, None])  # (C, C) -> (C, C, 1, 1) kernel
        logdet = constant_logdet(x.shape[2] * x.shape[3] * self.log_s.sum(), x)
        return y, logdet

    def inverse(self, y: Tensor) -> Tensor:
        return F.conv2d(y, self.weight_inverse()[:, :, None, None])  # (C, C, 1, 1) kernel
