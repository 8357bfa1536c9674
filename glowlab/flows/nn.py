"""Small network pieces shared by flow layers (not flows themselves)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ZeroConv2d(nn.Module):
    """3x3 convolution initialised to output zeros, with a learned per-channel output scale.

    Output = ``conv(x) * exp(3 · logs)``; the factor 3 lets the scale move faster than the weights
    early in training. Zero initialisation makes the layer it feeds start as the identity (a
    coupling) or as a standard normal (a prior).

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    logscale_factor = 3.0

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        # The output scale is folded into the (small) kernel and bias, so backprop keeps no extra
        # copy of the (large) output.
        scale = (self.logs * self.logscale_factor).exp().flatten()  # (1, out, 1, 1) -> (out,)
        return F.conv2d(x, self.weight * scale[:, None, None, None], self.bias * scale, padding=1)
