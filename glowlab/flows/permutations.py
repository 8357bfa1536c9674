"""Fixed channel permutations, and the factory that names every channel-mixing layer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from glowlab.flows.base import Flow, choose
from glowlab.flows.conv1x1 import InvConv1x1, InvConv1x1LU


class ChannelPermutation(Flow):
    """``y = x[:, perm]``: volume preserving, so ``logdet = 0``.

    References: Dinh et al., "Density estimation using Real NVP", ICLR 2017.
    """

    def __init__(self, perm: Tensor) -> None:
        super().__init__()
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return _take_channels(x, self.perm), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return _take_channels(y, self.inv_perm)


def _take_channels(x: Tensor, index: Tensor) -> Tensor:
    """``x[:, index]``, stored channels-last when ``x`` is (indexing dim 1 would give NCHW)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1)[..., index].permute(0, 3, 1, 2)  # gather in (B, H, W, C), back to (B, C, H, W)
    return x[:, index]


class Reverse(ChannelPermutation):
    """Reverses the channel order, as in RealNVP; the halves swap roles at every step.

    References: Dinh et al., "Density estimation using Real NVP", ICLR 2017.
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__(torch.arange(num_channels - 1, -1, -1))


class Shuffle(ChannelPermutation):
    """A fixed random channel permutation drawn once at construction.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, num_channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__(torch.randperm(num_channels, generator=generator))


# The channel-mixing layers by name; each takes (channels, generator).
PERMUTATIONS: dict[str, Callable[[int, torch.Generator | None], Flow]] = {
    "lu": InvConv1x1LU,
    "conv": InvConv1x1,
    "reverse": lambda channels, generator: Reverse(channels),
    "shuffle": Shuffle,
}


def make_permutation(name: str, num_channels: int, generator: torch.Generator | None = None) -> Flow:
    """The channel-mixing layer called ``name`` (a key of :data:`PERMUTATIONS`)."""
    return choose("permutation", name, PERMUTATIONS)(num_channels, generator)
