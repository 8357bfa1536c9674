"""A fixed affine map that standardises data with statistics measured once."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from glowlab.flows.base import Flow, constant_logdet


class Standardize(Flow):
    """``y = (x - mean) / std`` with fixed ``mean`` and ``std`` (buffers, not trained).

    Putting the data's standardisation inside the flow keeps every log-density in the data's own
    units: ``logdet = -sum(log std)`` is part of ``log p(x)``, so likelihoods of models trained on
    standardised data stay comparable with any other model of the raw data.

    References: Papamakarios et al., "Masked Autoregressive Flow for Density Estimation", NeurIPS 2017.
    """

    def __init__(self, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> None:
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.get_default_dtype()).flatten()
        std = torch.as_tensor(std, dtype=torch.get_default_dtype()).flatten()
        if mean.shape != std.shape:
            raise ValueError(f"mean and std must have the same length, got {mean.numel()} and {std.numel()}")
        if not torch.all(std > 0):
            raise ValueError("std must be positive in every dimension")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (x - self.mean) / self.std, constant_logdet(-self.std.log().sum(), x)

    def inverse(self, y: Tensor) -> Tensor:
        return y * self.std + self.mean
