"""Coupling layers: half the channels pass through and parameterise a transform of the rest.

Their ``forward`` takes optional ``kernels``: the (weight, bias) each layer of the network runs
with, when the caller has computed them (a Glow level computes all its steps' at once, see
:func:`glowlab.flows.nn.network_kernels`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from glowlab.flows.base import Flow, choose, sum_except_batch
from glowlab.flows.nn import NetKernels, affine_net, class_embedding, conditioned_net, coupling_net


def shift_and_scale(h: Tensor) -> tuple[Tensor, Tensor]:
    """An :func:`affine_net` output ``[shift | pre-scale]`` as ``(shift, sigmoid(pre-scale))``."""
    shift, pre = h.chunk(2, dim=1)
    return shift, torch.sigmoid(pre)


class AffineCoupling(Flow):
    """``y_b = (x_b + t(x_a)) * s(x_a)`` with ``s = sigmoid(h + 2)``; ``x_a`` passes through.

    The sigmoid keeps every scale in (0, 1) and near 0.88 at initialisation, which is more stable
    than ``exp`` for deep models. ``x_a`` is the first ``C // 2`` channels. With ``num_classes``
    the layer is conditional: the label (its context) adds a learned offset to the network's first
    hidden layer, so ``t`` and ``s`` depend on the class (zero at initialisation).

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, num_channels: int, hidden_channels: int, num_classes: int | None = None) -> None:
        super().__init__()
        self.split = num_channels // 2
        self.net = affine_net(self.split, hidden_channels, num_channels - self.split)
        self.class_embedding = class_embedding(num_classes, hidden_channels)
        self.conditional = num_classes is not None

    def forward(
        self, x: Tensor, context: Tensor | None = None, kernels: NetKernels | None = None
    ) -> tuple[Tensor, Tensor]:
        x_a, x_b = x.split([self.split, x.shape[1] - self.split], dim=1)
        shift, scale = shift_and_scale(conditioned_net(self.net, x_a, self.class_embedding, context, kernels))
        # One saved tensor (scale) serves the sigmoid, the product and the log: less activation memory.
        y_b = (x_b + shift) * scale
        return torch.cat([x_a, y_b], dim=1), sum_except_batch(torch.log(scale))

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        y_a, y_b = y.split([self.split, y.shape[1] - self.split], dim=1)
        shift, scale = shift_and_scale(conditioned_net(self.net, y_a, self.class_embedding, context))
        return torch.cat([y_a, y_b / scale - shift], dim=1)


class AdditiveCoupling(Flow):
    """``y_b = x_b + t(x_a)``: volume preserving (``logdet = 0``), as in NICE; conditional with
    ``num_classes`` as :class:`AffineCoupling`.

    References: Dinh et al., "NICE: Non-linear Independent Components Estimation", 2014.
    """

    def __init__(self, num_channels: int, hidden_channels: int, num_classes: int | None = None) -> None:
        super().__init__()
        self.split = num_channels // 2
        self.net = coupling_net(self.split, hidden_channels, num_channels - self.split)
        self.class_embedding = class_embedding(num_classes, hidden_channels)
        self.conditional = num_classes is not None

    def forward(
        self, x: Tensor, context: Tensor | None = None, kernels: NetKernels | None = None
    ) -> tuple[Tensor, Tensor]:
        x_a, x_b = x.split([self.split, x.shape[1] - self.split], dim=1)
        shift = conditioned_net(self.net, x_a, self.class_embedding, context, kernels)
        return torch.cat([x_a, x_b + shift], dim=1), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        y_a, y_b = y.split([self.split, y.shape[1] - self.split], dim=1)
        return torch.cat([y_a, y_b - conditioned_net(self.net, y_a, self.class_embedding, context)], dim=1)


class CheckerboardCoupling(Flow):
    """Affine coupling over a spatial checkerboard: pixels of one colour transform the others.

    ``y = m·x + (1 - m)·(x + t(m·x))·s(m·x)`` with ``m`` the checkerboard of ``parity`` (0: the
    pixel at (0, 0) conditions) and ``s = sigmoid(h + 2)`` as in :class:`AffineCoupling`; the
    log-determinant sums ``log s`` over the transformed pixels only. Alternating parities let
    every pixel be transformed.

    References: Dinh et al., "Density estimation using Real NVP", ICLR 2017.
    """

    def __init__(
        self, num_channels: int, hidden_channels: int, parity: int = 0, num_classes: int | None = None
    ) -> None:
        super().__init__()
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity}")
        self.parity = parity
        # The mask goes in as an extra channel so the net knows which pixels it may use.
        self.net = affine_net(num_channels + 1, hidden_channels, num_channels)
        self.class_embedding = class_embedding(num_classes, hidden_channels)
        self.conditional = num_classes is not None

    def _mask(self, x: Tensor) -> Tensor:
        h, w = x.shape[2], x.shape[3]
        rows = torch.arange(h, device=x.device)[:, None]
        cols = torch.arange(w, device=x.device)[None, :]
        return ((rows + cols + self.parity) % 2 == 0).to(x.dtype).expand(x.shape[0], 1, h, w)  # (B, 1, H, W)

    def _shift_scale(
        self, x_cond: Tensor, mask: Tensor, labels: Tensor | None, kernels: NetKernels | None = None
    ) -> tuple[Tensor, Tensor]:
        inputs = torch.cat([x_cond, mask], dim=1)  # (B, C + 1, H, W)
        if x_cond.is_contiguous(memory_format=torch.channels_last):
            # cat falls back to NCHW because the broadcast mask has no channels-last strides; the
            # convolutions run faster on the channels-last copy than on NCHW.
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return shift_and_scale(conditioned_net(self.net, inputs, self.class_embedding, labels, kernels))

    def forward(
        self, x: Tensor, context: Tensor | None = None, kernels: NetKernels | None = None
    ) -> tuple[Tensor, Tensor]:
        mask = self._mask(x)
        shift, scale = self._shift_scale(x * mask, mask, context, kernels)
        free = 1.0 - mask
        y = x * mask + free * (x + shift) * scale
        return y, sum_except_batch(free * torch.log(scale))

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        mask = self._mask(y)
        shift, scale = self._shift_scale(y * mask, mask, context)
        return y * mask + (1.0 - mask) * (y / scale - shift)


# The coupling layers by name. Each takes (channels, hidden channels, index of the step in its
# level, classes or None); the checkerboard alternates its parity with the index so that every
# pixel is transformed.
COUPLINGS: dict[str, Callable[[int, int, int, int | None], Flow]] = {
    "affine": lambda channels, hidden, index, classes: AffineCoupling(channels, hidden, classes),
    "additive": lambda channels, hidden, index, classes: AdditiveCoupling(channels, hidden, classes),
    "checkerboard": lambda channels, hidden, index, classes: CheckerboardCoupling(channels, hidden, index % 2, classes),
}


def make_coupling(
    name: str, num_channels: int, hidden_channels: int, index: int = 0, num_classes: int | None = None
) -> Flow:
    """The coupling layer called ``name`` (a key of :data:`COUPLINGS`) for the ``index``-th step of a level.

    With ``num_classes`` it is class-conditional (the label is its context).
    """
    return choose("coupling", name, COUPLINGS)(num_channels, hidden_channels, index, num_classes)
