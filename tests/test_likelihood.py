"""Hand-computed checks of the quantization and bits/dim conventions."""

from __future__ import annotations

import math

import pytest
import torch

from glowlab.likelihood import bin_centers, bits_per_dim, dequantize, quantize, reduce_bits, to_unit_range


def test_reduce_bits_keeps_the_top_bits() -> None:
    x = torch.tensor([0, 7, 8, 15, 16, 128, 255], dtype=torch.uint8)
    assert reduce_bits(x, 5).tolist() == [0, 0, 1, 1, 2, 16, 31]
    assert reduce_bits(x, 8).tolist() == x.tolist()
    assert reduce_bits(x, 1).tolist() == [0, 0, 0, 0, 0, 1, 1]
    with pytest.raises(TypeError, match="uint8"):
        reduce_bits(x.float(), 5)
    with pytest.raises(ValueError, match="n_bits"):
        reduce_bits(x, 0)


def test_dequantize_fills_each_bin() -> None:
    levels = torch.tensor([0, 3, 16]).repeat(1000)
    x = dequantize(levels, n_bins=17)
    assert x.min() >= -0.5 and x.max() < 0.5
    lower = levels / 17 - 0.5
    assert torch.all(x >= lower) and torch.all(x < lower + 1 / 17)
    assert torch.equal(quantize(x, 17), levels)
    # Fixed noise: k=3 of 4 bins with u=0.5 lands at (3 + 0.5)/4 - 0.5 = 0.375.
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(1, generator=torch.Generator().manual_seed(0)).item()
    assert dequantize(torch.tensor([3]), 4, generator=gen).item() == pytest.approx((3 + u) / 4 - 0.5)
    assert bin_centers(torch.tensor([3]), 4).item() == 0.375


def test_bits_per_dim_by_hand() -> None:
    # A density uniform on [-0.5, 0.5)^D has log p = 0: exactly log2(n_bins) bits per dimension.
    assert bits_per_dim(torch.tensor([0.0]), 3072, 256).item() == pytest.approx(8.0, abs=1e-6)
    assert bits_per_dim(torch.tensor([0.0]), 64, 17).item() == pytest.approx(math.log2(17), abs=1e-6)
    assert bits_per_dim(torch.tensor([0.0]), 3072, 32).item() == pytest.approx(5.0, abs=1e-6)
    # D = 2, n_bins = 4, log p = 1 nat: (-1 + 2 ln 4) / (2 ln 2) = 1.772588722 / 1.386294361.
    assert bits_per_dim(torch.tensor([1.0]), 2, 4).item() == pytest.approx(1.2786525, abs=1e-6)
    # One bit per dimension lost: log p = -D ln 2 adds exactly 1 bit/dim.
    assert bits_per_dim(torch.tensor([-10 * math.log(2)]), 10, 256).item() == pytest.approx(9.0, abs=1e-6)


def test_to_unit_range_maps_levels_to_display_intensities() -> None:
    x = bin_centers(torch.tensor([0, 8, 16]), 17)
    assert to_unit_range(x, 17).tolist() == [0.0, 0.5, 1.0]
    assert to_unit_range(torch.tensor([-3.0, 3.0]), 17).tolist() == [0.0, 1.0]  # clamped


def test_importance_weighted_bits_per_dim_by_hand() -> None:
    from glowlab.likelihood import importance_weighted_bits_per_dim

    # One dimension, two draws of 1 and 3 bits: weights 2^-1 and 2^-3, their mean 0.3125, -log2 = 1.678...
    bits = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    bound = importance_weighted_bits_per_dim(bits, num_dims=1)
    torch.testing.assert_close(bound, torch.tensor([-math.log2(0.3125), 2.0], dtype=torch.float64))
    # K = 1 is the draw itself; the bound never exceeds the mean of the draws (Jensen).
    torch.testing.assert_close(importance_weighted_bits_per_dim(bits[:1], 1), bits[0].double())
    assert bool((bound <= bits.double().mean(0) + 1e-12).all())
    # Large images: per-draw likelihoods of -1e5 nats would underflow as weights; log space keeps them.
    deep = importance_weighted_bits_per_dim(torch.tensor([[3.0], [3.0]]), num_dims=50_000)
    torch.testing.assert_close(deep, torch.tensor([3.0], dtype=torch.float64))
