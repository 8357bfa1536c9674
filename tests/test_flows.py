"""Image flow layers beyond the contract (tests/test_contract.py): initialisation, layouts, options."""

from __future__ import annotations

import pytest
import torch
from helpers import perturb

from glowlab.flows import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    InvConv1x1,
    InvConv1x1LU,
    Split,
    Squeeze,
    TopPrior,
    make_coupling,
    make_permutation,
)

SHAPE = (3, 4, 4, 4)  # (B, C, H, W): D = 64 per example keeps the Jacobian small


def initialised_actnorm(c: int) -> ActNorm:
    layer = ActNorm(c).double()
    layer(torch.randn(8, c, 4, 4, dtype=torch.float64) * 3 + 1)
    return layer


def test_conditional_top_prior_depends_on_the_label_and_needs_it() -> None:
    layer = perturb(TopPrior((4, 2, 2), num_classes=3).double())
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1])
    assert not torch.allclose(layer(x, labels)[0], layer(x, torch.tensor([1, 1, 1]))[0])
    with pytest.raises(ValueError, match="class-conditional"):
        layer(x)


def test_a_position_class_prior_moves_each_position_on_its_own() -> None:
    layer = TopPrior((4, 2, 2), num_classes=3, per_position=True).double()
    with torch.no_grad():
        layer.class_embedding.bias.zero_()
        layer.class_embedding.weight.zero_()
        # Class 1 moves the mean (even channels of the interleaved [mean | logs] pairs) of channel 0 at
        # one position only: (row 1, column 0), flat index 2 of the (2C, H, W) = (8, 2, 2) offsets.
        layer.class_embedding.weight[0 * 4 + 2, 1] = 0.5
    x = torch.zeros(2, 4, 2, 2, dtype=torch.float64)
    z, logdet = layer(x, torch.tensor([0, 1]))
    assert torch.equal(z[0], torch.zeros(4, 2, 2)) and torch.equal(logdet, torch.zeros(2, dtype=torch.float64))
    moved = (z[1] != 0).nonzero().tolist()
    assert moved == [[0, 1, 0]] and z[1, 0, 1, 0] == -0.5
    torch.testing.assert_close(layer.inverse(z, torch.tensor([0, 1])), x)


@pytest.mark.parametrize("conditioning", ["top", "top-position", "priors", "couplings"])
def test_each_conditioning_makes_the_density_depend_on_the_label(conditioning: str) -> None:
    from glowlab.models import Glow

    torch.manual_seed(0)
    model = Glow(image_shape=(1, 8, 8), n_bins=17, levels=2, steps=2, hidden_channels=8, num_classes=3,
                 conditioning=conditioning).double()  # fmt: skip
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64) - 0.5
    model.log_prob(x, torch.zeros(4, dtype=torch.long))  # ActNorm's initialisation
    embeddings = [m for name, m in model.named_modules() if name.endswith("class_embedding")]
    expected = {"top": 1, "top-position": 1, "priors": 2, "couplings": 2 + 4}[conditioning]
    assert len(embeddings) == expected  # top prior, the split's prior, the 2 x 2 couplings
    perturb(model, scale=0.1)
    y0, y1 = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    assert not torch.allclose(model.log_prob(x, y0), model.log_prob(x, y1))
    zs, _ = model.encode(x, y1)
    torch.testing.assert_close(model.decode(zs, y1), x)
    with pytest.raises(ValueError, match="labels"):
        model.log_prob(x)
    if conditioning in ("priors", "couplings"):
        with pytest.raises(ValueError, match="backprop"):
            Glow(
                image_shape=(1, 8, 8),
                levels=2,
                steps=2,
                num_classes=3,
                conditioning=conditioning,
                backprop="invertible",
            )


def test_actnorm_initialises_to_unit_statistics() -> None:
    layer = ActNorm(3)
    x = (
        torch.randn(64, 3, 5, 5) * torch.tensor([2.0, 0.5, 7.0])[:, None, None]
        + torch.tensor([1.0, -3.0, 0.0])[:, None, None]
    )
    y, _ = layer(x)
    assert bool(layer.initialized)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    before = layer.logs.detach().clone()
    layer(torch.randn(8, 3, 5, 5))  # a second batch must not re-initialise
    assert torch.equal(before, layer.logs.detach())


def test_actnorm_guards_a_constant_channel() -> None:
    layer = ActNorm(2)
    x = torch.randn(16, 2, 4, 4)
    x[:, 1] = 0.25  # zero standard deviation
    y, logdet = layer(x)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    assert layer.logs[0, 1].item() == 0.0  # the constant channel is centred, not scaled
    assert y[:, 1].abs().max() < 1e-6


def test_actnorm_does_not_initialise_in_eval_mode() -> None:
    layer = ActNorm(2).eval()
    layer(torch.randn(4, 2, 3, 3) * 5)
    assert not bool(layer.initialized)


def test_actnorm_initialized_flag_in_state_dict() -> None:
    layer = initialised_actnorm(4)
    state = layer.state_dict()
    assert "initialized" in state and bool(state["initialized"])
    fresh = ActNorm(4).double()
    fresh.load_state_dict(state)
    assert bool(fresh.initialized)
    fresh.train()(torch.randn(8, 4, 4, 4, dtype=torch.float64) * 100)
    torch.testing.assert_close(fresh.logs, layer.logs)


def test_lu_weight_and_logdet_agree_with_dense_slogdet() -> None:
    layer = perturb(InvConv1x1LU(6).double())
    w = layer.weight()
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    y, logdet = layer(x)
    torch.testing.assert_close(y, torch.einsum("oc,bchw->bohw", w, x))
    torch.testing.assert_close(logdet, torch.full((2,), 15 * torch.linalg.slogdet(w)[1].item(), dtype=torch.float64))
    lower, upper = layer.factors()
    assert torch.equal(torch.diagonal(lower), torch.ones(6, dtype=torch.float64))
    assert torch.equal(torch.tril(upper, -1), torch.zeros(6, 6, dtype=torch.float64))


def test_one_by_one_convs_start_orthogonal() -> None:
    for layer in (InvConv1x1(8), InvConv1x1LU(8)):
        w = layer.weight if isinstance(layer.weight, torch.Tensor) else layer.weight()
        torch.testing.assert_close(w @ w.T, torch.eye(8), atol=1e-5, rtol=0)


def test_zero_initialised_layers_start_as_identity() -> None:
    x = torch.randn(2, 4, 4, 4)
    for layer in (AffineCoupling(4, 8), AdditiveCoupling(4, 8)):
        y, _ = layer(x)
        if isinstance(layer, AdditiveCoupling):
            torch.testing.assert_close(y, x)
        else:  # scale = sigmoid(2) on the transformed half
            torch.testing.assert_close(y[:, 2:], x[:, 2:] * torch.sigmoid(torch.tensor(2.0)))
    y, logdet = Split(4)(x)
    torch.testing.assert_close(y, x)
    assert torch.equal(logdet, torch.zeros(2))


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_squeeze_moves_2x2_blocks_to_channels(memory_format: str) -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    squeeze = Squeeze(memory_format)
    y, _ = squeeze(x)
    assert y.shape == (1, 4, 2, 2)
    # Channel k holds the pixel at offset (k // 2, k % 2) of each 2x2 block.
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="even height and width"):
        squeeze(torch.zeros(1, 1, 3, 4))


def test_squeeze_memory_formats_store_the_same_values() -> None:
    x = torch.randn(2, 3, 8, 12)
    fast, plain = Squeeze("channels_last"), Squeeze("contiguous")
    y = fast(x)[0]
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, plain(x)[0])
    assert torch.equal(fast(y)[0], plain(y)[0])  # a channels-last input too
    back = fast.inverse(y)
    assert back.is_contiguous(memory_format=torch.channels_last) and torch.equal(back, x)
    with pytest.raises(ValueError, match="memory_format='nhwc'"):
        Squeeze("nhwc")


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="permutation='lu2'"):
        make_permutation("lu2", 4)
    with pytest.raises(ValueError, match="coupling='affin'"):
        make_coupling("affin", 4, 8)
