"""Coupling layers: half the channels pass through and parameterise a transform of the rest."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from glowlab.flows.base import Flow, sum_except_batch
from glowlab.flows.nn import ZeroConv2d

COUPLINGS = ("affine", "additive")


def coupling_net(in_channels: int, hidden_channels: int, out_channels: int) -> nn.Sequential:
    """Glow's coupling network: 3x3 conv, ReLU, 1x1 conv, ReLU, zero-initialised 3x3 conv.

    The zero-initialised output makes every coupling start as the identity, which is what lets
    deep Glow models train from the first step.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden_channels, hidden_channels, 1),
        nn.ReLU(),
        ZeroConv2d(hidden_channels, out_channels),
    )


class AffineCoupling(Flow):
    """``y_b = (x_b + t(x_a)) * s(x_a)`` with ``s = sigmoid(h + 2)``; ``x_a`` passes through.

    The sigmoid keeps every scale in (0, 1) and near 0.88 at initialisation, which is more stable
    than ``exp`` for deep models. ``x_a`` is the first ``C // 2`` channels.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, num_channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.split = num_channels // 2
        self.net = coupling_net(self.split, hidden_channels, 2 * (num_channels - self.split))

    def _shift_scale(self, x_a: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(x_a)
        # Interleaved channels, as in the reference implementation: even = shift, odd = scale.
        return h[:, 0::2], torch.sigmoid(h[:, 1::2] + 2.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = x[:, : self.split], x[:, self.split :]
        shift, scale = self._shift_scale(x_a)
        # One saved tensor (scale) serves the sigmoid, the product and the log: less activation memory.
        y_b = (x_b + shift) * scale
        return torch.cat([x_a, y_b], dim=1), sum_except_batch(torch.log(scale))

    def inverse(self, y: Tensor) -> Tensor:
        y_a, y_b = y[:, : self.split], y[:, self.split :]
        shift, scale = self._shift_scale(y_a)
        return torch.cat([y_a, y_b / scale - shift], dim=1)


class AdditiveCoupling(Flow):
    """``y_b = x_b + t(x_a)``: volume preserving (``logdet = 0``), as in NICE.

    References: Dinh et al., "NICE: Non-linear Independent Components Estimation", 2014.
    """

    def __init__(self, num_channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.split = num_channels // 2
        self.net = coupling_net(self.split, hidden_channels, num_channels - self.split)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = x[:, : self.split], x[:, self.split :]
        return torch.cat([x_a, x_b + self.net(x_a)], dim=1), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        y_a, y_b = y[:, : self.split], y[:, self.split :]
        return torch.cat([y_a, y_b - self.net(y_a)], dim=1)


def make_coupling(name: str, num_channels: int, hidden_channels: int) -> Flow:
    """The coupling layer called ``name``: ``"affine"`` or ``"additive"``."""
    if name == "affine":
        return AffineCoupling(num_channels, hidden_channels)
    if name == "additive":
        return AdditiveCoupling(num_channels, hidden_channels)
    raise ValueError(f"coupling={name!r} is not one of {', '.join(map(repr, COUPLINGS))}")
