"""Space-to-depth reshaping between the levels of a multiscale flow."""

from __future__ import annotations

from torch import Tensor

from glowlab.flows.base import Flow


class Squeeze(Flow):
    """Moves each 2x2 spatial block into channels: (B, C, H, W) -> (B, 4C, H/2, W/2), ``logdet = 0``.

    References: Dinh et al., "Density estimation using Real NVP", ICLR 2017.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even height and width, got input of shape {tuple(x.shape)}")
        y = x.reshape(b, c, h // 2, 2, w // 2, 2)  # (B, C, H/2, 2, W/2, 2)
        y = y.permute(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, H/2, W/2)
        return y.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)  # (B, 4C, H/2, W/2)

    def inverse(self, y: Tensor) -> Tensor:
        b, c4, h, w = y.shape
        x = y.reshape(b, c4 // 4, 2, 2, h, w)  # (B, C, 2, 2, H/2, W/2)
        x = x.permute(0, 1, 4, 2, 5, 3)  # (B, C, H/2, 2, W/2, 2)
        return x.reshape(b, c4 // 4, 2 * h, 2 * w)  # (B, C, H, W)
