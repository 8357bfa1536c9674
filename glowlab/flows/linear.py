"""Invertible linear maps of vectors."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from glowlab.flows.base import constant_logdet
from glowlab.flows.conv1x1 import LUFactorised


class LULinear(LUFactorised):
    """``y = x W^T + b`` on (B, D) with the LU-factorised ``W = P L U`` of :class:`LUFactorised`.

    ``log|det W| = sum(log_s)`` is the same for every example; ``W`` starts as a random rotation and
    ``b`` at zero.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, features: int, generator: torch.Generator | None = None) -> None:
        super().__init__(features, generator)
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x @ self.weight().T + self.bias, constant_logdet(self.log_s.sum(), x)

    def inverse(self, y: Tensor) -> Tensor:
        return (y - self.bias) @ self.weight_inverse().T

    def inverse_with_logdet(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.inverse(y), constant_logdet(-self.log_s.sum(), y)
