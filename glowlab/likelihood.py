"""Likelihood bookkeeping: quantization, dequantization and bits per dimension.

Conventions (the Glow paper's, used everywhere in glowlab):

* Images are integers ``k`` in ``{0, ..., n_bins - 1}`` per dimension. 8-bit data reduced to
  ``n_bits`` keeps the top bits: ``k = floor(x / 2**(8 - n_bits))`` and ``n_bins = 2**n_bits``.
* Uniform dequantization maps ``k`` to ``x = (k + u) / n_bins - 0.5`` with ``u ~ U[0, 1)``, so the
  model sees continuous values in [-0.5, 0.5) and its density ``p`` lives there.
* The model's discrete log-likelihood is bounded below by ``log p(x) - D · log(n_bins)`` (the
  Jacobian of the scaling by ``1/n_bins`` in each of ``D`` dimensions, with the uniform noise as
  the variational distribution), so bits per dimension are
  ``bpd = (-log p(x) + D · log(n_bins)) / (D · ln 2)``.
  A model that is uniform on [-0.5, 0.5)^D has ``log p = 0`` and scores exactly
  ``log2(n_bins)`` bits/dim: 8 for 8-bit data.
* Variational dequantization (Flow++) draws ``u`` from a learned density ``q(u | k)`` on the bin
  instead. The bound becomes ``log P(k) >= E_q[log p(x) - log q(u | k)] - D · log(n_bins)``, so
  ``bpd = (-log p(x) + log q(u | k) + D · log(n_bins)) / (D · ln 2)``; uniform noise is the case
  ``q = 1`` (``log q = 0``) of the same formula, and the best ``q`` (the model's own distribution of
  ``x`` within the bin) makes the bound exact.
* scikit-learn's digits have 17 grey levels (0..16). glowlab models them with ``n_bins = 17``:
  every observed level is its own bin, nothing is merged and no empty bins are invented, so the
  bound is on the likelihood of the data exactly as shipped; the uniform baseline is
  ``log2(17) = 4.087`` bits/dim.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def reduce_bits(images: Tensor, n_bits: int) -> Tensor:
    """Keep the top ``n_bits`` bits of uint8 images: integers in ``{0, ..., 2**n_bits - 1}``."""
    if images.dtype != torch.uint8:
        raise TypeError(f"reduce_bits expects uint8 images, got {images.dtype}")
    if not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be in 1..8, got {n_bits}")
    return torch.div(images, 2 ** (8 - n_bits), rounding_mode="floor")


def dequantize(
    levels: Tensor, n_bins: int, generator: torch.Generator | None = None, noise: Tensor | None = None
) -> Tensor:
    """``(k + u) / n_bins - 0.5`` with ``u ~ U[0, 1)``: float images in [-0.5, 0.5).

    ``u`` is drawn from ``generator`` unless ``noise`` (values in [0, 1), shaped like ``levels``)
    is given.
    """
    k = levels.to(torch.get_default_dtype())
    u = torch.rand(k.shape, generator=generator, dtype=k.dtype, device=k.device) if noise is None else noise.to(k)
    return (k + u) / n_bins - 0.5


def per_sample_uniform(indices: Tensor, shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """Uniform noise of ``shape`` per sample, fixed by ``(seed, index)``: shape ``(len(indices), *shape)``.

    Evaluation uses it so that a sample's dequantization does not depend on batch size, worker or
    rank layout: bits/dim on a test set is the same number on one process or on many.
    """
    # numpy's SeedSequence takes (seed, index) whole; torch's CPU generator keeps only 32 bits of a seed.
    rows = [np.random.default_rng([seed, int(i)]).random(shape, dtype=np.float32) for i in indices.tolist()]
    return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, *shape)


def bin_centers(levels: Tensor, n_bins: int) -> Tensor:
    """``(k + 0.5) / n_bins - 0.5``: each integer level at the centre of its bin, without noise."""
    return (levels.to(torch.get_default_dtype()) + 0.5) / n_bins - 0.5


def quantize(x: Tensor, n_bins: int) -> Tensor:
    """Inverse of :func:`dequantize`: the integer level of each value, clamped to the valid range."""
    return torch.floor((x + 0.5) * n_bins).clamp(0, n_bins - 1).long()


def to_unit_range(x: Tensor, n_bins: int) -> Tensor:
    """Model-space values as display intensities in [0, 1]: level / (n_bins - 1)."""
    return quantize(x, n_bins).to(x.dtype) / (n_bins - 1)


def bits_per_dim(log_prob: Tensor, num_dims: int, n_bins: int) -> Tensor:
    """Bits/dim of the discrete data from the continuous ``log_prob`` (nats) on [-0.5, 0.5)^D."""
    return (-log_prob + num_dims * math.log(n_bins)) / (num_dims * math.log(2.0))


def variational_bits_per_dim(log_prob: Tensor, log_q: Tensor, num_dims: int, n_bins: int) -> Tensor:
    """Bits/dim of the variational bound: ``(-log p(x) + log q(u | k) + D · log(n_bins)) / (D · ln 2)``.

    ``log_prob`` is the model's continuous log-density of the dequantized image ``x = (k + u) /
    n_bins - 0.5`` and ``log_q`` the log-density of its noise ``u`` on the unit bin, both in nats,
    shape (B,). ``log_q = 0`` (uniform noise) gives :func:`bits_per_dim`.

    References: Ho et al., "Flow++", ICML 2019, eq. (12).
    """
    return bits_per_dim(log_prob - log_q, num_dims, n_bins)


def importance_weighted_bits_per_dim(bits: Tensor, num_dims: int) -> Tensor:
    """The importance-weighted bound of K dequantization draws, in bits/dim.

    ``bits`` (K, B) holds each draw's bits/dim, ``-log2(p(x + u_k) / q(u_k)) / D`` (what
    :func:`variational_bits_per_dim` gives; :func:`bits_per_dim` for uniform noise, whose density
    on the bin is ``q = n_bins^D``).
    Returns (B,) ``-log2(mean_k p(x + u_k) / q(u_k)) / D``, computed with ``logsumexp`` in float64 so
    no weight underflows: K = 1 is the draw itself, and the bound tightens towards the discrete
    model's exact bits/dim as K grows.

    References: Burda et al., "Importance Weighted Autoencoders", ICLR 2016; Ho et al., "Flow++",
    ICML 2019 (the bound for dequantized flows).
    """
    if bits.dim() != 2 or bits.shape[0] < 1:
        raise ValueError(f"expected (draws, images) bits, got shape {tuple(bits.shape)}")
    per_draw_nats = -bits.double() * (num_dims * math.log(2.0))  # (K, B): log p(x + u_k) / q(u_k)
    log_mean = torch.logsumexp(per_draw_nats, dim=0) - math.log(bits.shape[0])
    return -log_mean / (num_dims * math.log(2.0))


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """Mean and standard error of a 1-D tensor (in float64)."""
    values = values.double()
    n = values.numel()
    return float(values.mean()), float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
