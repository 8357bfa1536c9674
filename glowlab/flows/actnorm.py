"""Activation normalisation with data-dependent initialisation."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from glowlab.flows.base import Flow, constant_logdet


class ActNorm(Flow):
    """Per-channel affine ``y = (x + bias) * exp(logs)``, initialised from the first training batch.

    The first forward pass in training mode sets ``bias`` and ``logs`` so that the batch's
    per-channel activations have zero mean and unit variance. In a ``torch.distributed`` job the
    statistics are reduced over all ranks first, so every rank starts from identical parameters.
    A channel whose standard deviation is (near) zero is only centred: dividing by ~0 would blow up
    the activations and the log-determinant. The ``initialized`` flag is a buffer, so it travels
    with ``state_dict`` and a loaded model is never re-initialised. ``is_initialized`` mirrors it as
    a plain Python bool (set by :meth:`initialize` and by ``load_state_dict``), so the forward pass
    never reads the buffer: on a GPU that read would be a device-to-host synchronisation every
    step, and for ``torch.compile`` a graph break.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, num_channels: int, min_std: float = 1e-6) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.min_std = min_std
        self.bias = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.is_initialized = False

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set ``bias`` and ``logs`` from the statistics of the batch ``x`` of shape (B, C, H, W)."""
        # Moments as sums so they can be added over ranks before dividing.
        stats = torch.stack(
            [
                x.new_full((self.num_channels,), x.numel() / self.num_channels),
                x.sum(dim=(0, 2, 3)),
                (x * x).sum(dim=(0, 2, 3)),
            ]
        ).double()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        count, total, total_sq = stats
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0.0)
        std = var.sqrt()
        std = torch.where(std > self.min_std, std, torch.ones_like(std))
        self.bias.copy_((-mean).view_as(self.bias))
        self.logs.copy_((-std.log()).view_as(self.logs))
        self.initialized.fill_(True)
        self.is_initialized = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        flag = state_dict.get(prefix + "initialized")
        if flag is not None:
            self.is_initialized = bool(flag)  # read once at load time, never in forward

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not self.is_initialized:
            self.initialize(x)
        y = (x + self.bias) * self.logs.exp()
        logdet = constant_logdet(x.shape[2] * x.shape[3] * self.logs.sum(), x)
        return y, logdet

    def inverse(self, y: Tensor) -> Tensor:
        return y * (-self.logs).exp() - self.bias
