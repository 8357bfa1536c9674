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


class InvConv1x1LU(Flow):
    """1x1 convolution with ``W = P L (U + diag(sign · exp(log_s)))``.

    ``P`` is a fixed permutation, ``L`` unit lower triangular, ``U`` strictly upper triangular;
    ``log|det W| = sum(log_s)``, so the log-determinant costs O(C) instead of O(C^3).

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, num_channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        p, lower, upper = torch.linalg.lu(random_rotation(num_channels, generator))
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(num_channels, num_channels), -1))
        self.register_buffer("eye", torch.eye(num_channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(s.abs().log())

    def factors(self) -> tuple[Tensor, Tensor]:
        """The unit lower factor ``L`` and the upper factor ``U + diag(sign · exp(log_s))``."""
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return lower, upper

    def weight(self) -> Tensor:
        lower, upper = self.factors()
        return self.p @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = F.conv2d(x, self.weight()[:, :, None, None])  # (C, C) -> (C, C, 1, 1) kernel
        logdet = constant_logdet(x.shape[2] * x.shape[3] * self.log_s.sum(), x)
        return y, logdet

    def inverse(self, y: Tensor) -> Tensor:
        lower, upper = self.factors()
        # W^-1 = U^-1 L^-1 P^T, by two triangular solves rather than a general inverse.
        lower_inv_pt = torch.linalg.solve_triangular(lower, self.p.T, upper=False, unitriangular=True)
        w_inv = torch.linalg.solve_triangular(upper, lower_inv_pt, upper=True)
        return F.conv2d(y, w_inv[:, :, None, None])  # (C, C, 1, 1) kernel
