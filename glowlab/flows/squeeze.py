"""Space-to-depth reshaping between the levels of a multiscale flow."""

from __future__ import annotations

import torch
from torch import Tensor

from glowlab.flows.base import Flow, check_option

MEMORY_FORMATS = ("contiguous", "channels_last")


class Squeeze(Flow):
    """Moves each 2x2 spatial block into channels: (B, C, H, W) -> (B, 4C, H/2, W/2), ``logdet = 0``.

    Output channel ``4c + 2i + j`` holds input channel ``c`` at offset ``(i, j)`` of each block.
    ``memory_format`` only decides how the output is stored: ``"channels_last"`` (channels
    innermost, what oneDNN and cuDNN convolutions run fastest on) or ``"contiguous"`` (NCHW). The
    values are the same either way and both cost one copy.

    References: Dinh et al., "Density estimation using Real NVP", ICLR 2017.
    """

    def __init__(self, memory_format: str = "contiguous") -> None:
        super().__init__()
        check_option("memory_format", memory_format, MEMORY_FORMATS)
        self.memory_format = memory_format

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even height and width, got input of shape {tuple(x.shape)}")
        if self.memory_format == "channels_last":
            y = x.permute(0, 2, 3, 1).reshape(b, h // 2, 2, w // 2, 2, c)  # (B, H/2, 2, W/2, 2, C)
            y = y.permute(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, 4 * c)  # (B, H/2, W/2, 4C)
            return y.permute(0, 3, 1, 2), x.new_zeros(b)  # (B, 4C, H/2, W/2), channels last in memory
        y = x.reshape(b, c, h // 2, 2, w // 2, 2)  # (B, C, H/2, 2, W/2, 2)
        y = y.permute(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, H/2, W/2)
        return y.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)  # (B, 4C, H/2, W/2)

    def inverse(self, y: Tensor) -> Tensor:
        b, c4, h, w = y.shape
        if self.memory_format == "channels_last":
            x = y.permute(0, 2, 3, 1).reshape(b, h, w, c4 // 4, 2, 2)  # (B, H/2, W/2, C, 2, 2)
            x = x.permute(0, 1, 4, 2, 5, 3).reshape(b, 2 * h, 2 * w, c4 // 4)  # (B, H, W, C)
            return x.permute(0, 3, 1, 2)  # (B, C, H, W), channels last in memory
        x = y.reshape(b, c4 // 4, 2, 2, h, w)  # (B, C, 2, 2, H/2, W/2)
        x = x.permute(0, 1, 4, 2, 5, 3)  # (B, C, H/2, 2, W/2, 2)
        return x.reshape(b, c4 // 4, 2 * h, 2 * w)  # (B, C, H, W)


def to_memory_format(x: Tensor, memory_format: str) -> Tensor:
    """``x`` stored in ``memory_format`` (one of :data:`MEMORY_FORMATS`); no copy if it already is."""
    check_option("memory_format", memory_format, MEMORY_FORMATS)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    return x.contiguous(memory_format=fmt)
