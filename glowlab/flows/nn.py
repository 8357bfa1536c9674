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

    def __init__(self, in_channels: int, out_channels: int, offset: Tensor | None = None, halves: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        # With ``halves`` the output channels come out as [even..., odd...] rather than interleaved
        # as the parameters are (the reference implementation's layout, kept for checkpoints): the
        # two outputs of a coupling or prior net are then its channel halves, whose gradients
        # assemble into the convolution's memory format. Interleaved halves would be gathered back
        # by a stack, in NCHW, and a channels-last convolution's backward would pay to convert.
        order = torch.cat([torch.arange(0, out_channels, 2), torch.arange(1, out_channels, 2)]) if halves else None
        self.register_buffer("order", order, persistent=False)
        # A fixed per-channel constant added to the output (neither learned nor saved), in output
        # order: a layer that shifts this output before a nonlinearity (the coupling's ``+ 2`` before
        # its sigmoid) folds the shift into the bias here instead of a pass over the activations.
        self.register_buffer("offset", torch.zeros(out_channels) if offset is None else offset, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        # The output scale is folded into the (small) kernel and bias, so backprop keeps no extra
        # copy of the (large) output.
        scale = (self.logs.view(-1) * self.logscale_factor).exp()  # (1, out, 1, 1) -> (out,)
        weight = self.weight * scale.view(-1, 1, 1, 1)  # (out,) -> (out, 1, 1, 1): scales each filter
        bias = self.bias * scale
        if self.order is not None:
            weight, bias = weight.index_select(0, self.order), bias.index_select(0, self.order)
        return F.conv2d(x, weight, bias + self.offset, padding=1)


def interleaved_halves(h: Tensor) -> tuple[Tensor, Tensor]:
    """Even and odd channels of ``h`` (B, 2C, H, W) as two (B, C, H, W) views, in one operator.

    Glow's learned top prior interleaves its two outputs (mean and log-scale) over the channels,
    as the reference implementation does.
    """
    return h.unflatten(1, (-1, 2)).unbind(2)  # (B, 2C, H, W) -> (B, C, 2, H, W) -> 2 x (B, C, H, W)
