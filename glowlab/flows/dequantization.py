"""Variational dequantization: a learned conditional density q(u | k) of the noise that makes images continuous.

Uniform dequantization adds ``u ~ U[0, 1)^D`` to the integer image ``k``; the bound it gives on the
discrete likelihood is loose by ``KL(U || p(u | k))``, because the model must spread its density
evenly over every bin. Flow++ learns the noise instead: ``u = Φ(f(ε; k))`` where ``ε ~ N(0, I)``,
``f`` is an invertible flow whose networks see ``k``, and ``Φ`` is the standard normal CDF, which
maps the real line onto the bin (0, 1). Its log-density ``log q(u | k)`` enters the bound (see
:func:`glowlab.likelihood.variational_bits_per_dim`).

The base noise ``ε`` is not drawn here: it is ``Φ⁻¹(u₀)`` of a uniform draw ``u₀``, the one the data
pipeline already makes (fresh per training batch, fixed per image for evaluation), so the
variational model keeps the pipeline's seeding, resumption and per-image evaluation noise. ``f``
starts as the identity, where ``u = u₀`` and ``log q = 0``: training starts from uniform
dequantization exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from glowlab.flows.base import sum_except_batch
from glowlab.flows.nn import ZeroConv2d

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def checkerboard(height: int, width: int, parity: int) -> Tensor:
    """(1, 1, H, W) mask: 1 where ``(row + column + parity)`` is even."""
    rows = torch.arange(height).view(-1, 1)  # (H,) -> (H, 1)
    cols = torch.arange(width).view(1, -1)  # (W,) -> (1, W)
    return ((rows + cols + parity) % 2 == 0).float().view(1, 1, height, width)  # (H, W) -> (1, 1, H, W)


class NoiseCoupling(nn.Module):
    """A checkerboard affine coupling over the noise, its network conditioned on features of the image."""

    def __init__(self, channels: int, features: int, hidden: int, parity: int, spatial: tuple[int, int]) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels + features, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            ZeroConv2d(hidden, 2 * channels),
        )
        self.register_buffer("mask", checkerboard(*spatial, parity), persistent=False)

    def forward(self, eps: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(eps', log|det d eps'/d eps|)``: the unmasked half moved by a shift and scale of the masked half."""
        kept = eps * self.mask
        shift, raw = self.net(torch.cat([kept, features], dim=1)).chunk(2, dim=1)
        log_scale = 2.0 * torch.tanh(raw / 2.0) * (1 - self.mask)  # bounded: no step can blow the noise up
        out = kept + (1 - self.mask) * (eps * log_scale.exp() + shift)
        return out, sum_except_batch(log_scale)


class VariationalDequantizer(nn.Module):
    """q(u | k): dequantization noise in (0, 1)^D for the integer image ``k``, with its log-density.

    ``steps`` checkerboard couplings (alternating parity) act on ``ε = Φ⁻¹(u₀)``; a small
    convolutional network of the image (its bin centres) gives every coupling ``channels`` feature
    maps; ``u = Φ(ε')``. ``log q(u | k) = log N(ε) - log|det dε'/dε| - Σ log φ(ε')``, where φ is
    the standard normal density (the Jacobian of Φ).

    References: Ho et al., "Flow++: Improving Flow-Based Generative Models with Variational
    Dequantization and Architecture Design", ICML 2019.
    """

    def __init__(self, image_shape: tuple[int, int, int], n_bins: int, steps: int = 4, channels: int = 32) -> None:
        super().__init__()
        c, h, w = image_shape
        self.n_bins = n_bins
        self.features = nn.Sequential(
            nn.Conv2d(c, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
        )
        self.couplings = nn.ModuleList(NoiseCoupling(c, channels, channels, k % 2, (h, w)) for k in range(steps))

    def forward(self, noise: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
        """``(u, log q(u | k))`` from base uniform ``noise`` in [0, 1) and integer ``levels`` of the same shape."""
        dtype = noise.dtype if noise.is_floating_point() else torch.get_default_dtype()
        centres = (levels.to(dtype) + 0.5) / self.n_bins - 0.5  # the image as the model sees it, noise-free
        features = self.features(centres)
        # Base noise kept one machine epsilon inside (0, 1), so that Φ⁻¹ stays finite (|ε| < 5.2 in float32).
        edge = torch.finfo(dtype).eps
        eps = torch.special.ndtri(noise.to(dtype).clamp(edge, 1 - edge))
        log_q = -sum_except_batch(0.5 * eps.square() + _HALF_LOG_2PI)  # log N(ε)
        for coupling in self.couplings:
            eps, logdet = coupling(eps, features)
            log_q = log_q - logdet
        # log φ(ε') = -ε'^2 / 2 - log √(2π): the density of Φ's output on (0, 1) divides by it.
        log_q = log_q + sum_except_batch(0.5 * eps.square() + _HALF_LOG_2PI)
        # Φ rounds to 1 in floating point beyond ε' ≈ 5.4 (float32): keep u inside its bin, [0, 1).
        u = torch.special.ndtr(eps).clamp(max=1 - edge)
        return u, log_q
