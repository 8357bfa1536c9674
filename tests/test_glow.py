"""The whole multiscale Glow: exactness of encode/decode, log_prob, sampling, state and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import flat, per_example_slogdet, perturb

from glowlab.models import Glow

TINY = dict(image_shape=(2, 4, 4), levels=2, steps=2, hidden_channels=8)


def tiny_glow(**kwargs) -> Glow:
    model = Glow(**{**TINY, **kwargs}).double().train()
    model.log_prob(torch.rand(16, *model.image_shape, dtype=torch.float64) - 0.5, _labels(16, model))  # ActNorm init
    return perturb(model)


def _labels(n: int, model: Glow) -> torch.Tensor | None:
    return torch.arange(n) % model.num_classes if model.num_classes else None


VARIANTS = [
    dict(coupling="affine", permutation="lu"),
    dict(coupling="affine", permutation="conv"),
    dict(coupling="additive", permutation="reverse"),
    dict(coupling="additive", permutation="shuffle"),
    dict(coupling="affine", permutation="lu", learn_top=False),
    dict(coupling="affine", permutation="lu", num_classes=3),
    dict(coupling="affine", permutation="lu", num_classes=3, conditioning="couplings"),
    dict(coupling="affine", permutation="lu", levels=3, image_shape=(1, 8, 8)),
    dict(architecture="realnvp", permutation="reverse", image_shape=(1, 8, 8)),
    dict(architecture="nice", coupling="additive", levels=1, learn_top=False),
    dict(coupling="affine", permutation="lu", memory_format="contiguous"),
]
IDS = [
    "affine-lu",
    "affine-conv",
    "additive-reverse",
    "additive-shuffle",
    "fixed-top",
    "conditional",
    "conditional-couplings",
    "3-levels",
    "realnvp",
    "nice",
    "contiguous",
]


@pytest.mark.parametrize("kwargs", VARIANTS, ids=IDS)
def test_round_trip_float64(kwargs: dict) -> None:
    model = tiny_glow(**kwargs)
    x = torch.rand(3, *model.image_shape, dtype=torch.float64) - 0.5
    y = _labels(3, model)
    zs, logdet = model.encode(x, y)
    assert [tuple(z.shape[1:]) for z in zs] == list(model.z_shapes)
    assert logdet.shape == (3,)
    assert (model.decode(zs, y) - x).abs().max() < 1e-8
    # Latents at temperature 0.5, where a random tiny model's samples lie: at 1 an unlucky draw can
    # reach a region where its (random, badly conditioned) inverse overflows.
    zs2 = [0.5 * torch.randn_like(z) for z in zs]
    for a, b in zip(model.encode(model.decode(zs2, y), y)[0], zs2, strict=True):
        assert (a - b).abs().max() < 1e-8


@pytest.mark.parametrize("kwargs", VARIANTS, ids=IDS)
def test_logdet_matches_jacobian_both_directions(kwargs: dict) -> None:
    model = tiny_glow(**kwargs)
    x = torch.rand(2, *model.image_shape, dtype=torch.float64) - 0.5
    y = _labels(2, model)
    zs, logdet = model.encode(x, y)
    torch.testing.assert_close(logdet, per_example_slogdet(lambda v: model.encode(v, y)[0], x), rtol=1e-9, atol=1e-9)

    shapes = [z.shape for z in zs]

    def decode_flat(v: torch.Tensor) -> torch.Tensor:
        parts, start = [], 0
        for s in shapes:
            n = math.prod(s[1:])
            parts.append(v[:, start : start + n].reshape(s))  # (B, n) -> (B, C, H, W) of that level
            start += n
        return model.decode(parts, y)

    z = torch.randn_like(flat(zs))
    expected = -model.encode(decode_flat(z), y)[1]
    torch.testing.assert_close(per_example_slogdet(decode_flat, z), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kwargs", VARIANTS[:2] + VARIANTS[5:6], ids=["affine-lu", "affine-conv", "conditional"])
def test_log_prob_equals_base_density_plus_jacobian(kwargs: dict) -> None:
    model = tiny_glow(**kwargs)
    x = torch.rand(2, *model.image_shape, dtype=torch.float64) - 0.5
    y = _labels(2, model)
    z = flat(model.encode(x, y)[0])
    base = -0.5 * (z**2).sum(dim=1) - 0.5 * z.shape[1] * math.log(2 * math.pi)
    expected = base + per_example_slogdet(lambda v: model.encode(v, y)[0], x)
    torch.testing.assert_close(model.log_prob(x, y), expected, rtol=1e-10, atol=1e-10)


def test_decode_of_encode_float32() -> None:
    model = Glow(image_shape=(3, 16, 16), levels=3, steps=4, hidden_channels=32)
    x = torch.rand(4, 3, 16, 16) - 0.5
    model.log_prob(x)  # ActNorm init
    perturb(model, scale=0.02)
    zs, _ = model.encode(x)
    assert (model.decode(zs) - x).abs().max() < 1e-4


def test_z_shapes_and_dims() -> None:
    model = Glow(image_shape=(3, 32, 32), levels=3, steps=1, hidden_channels=8)
    assert model.z_shapes == ((6, 16, 16), (12, 8, 8), (48, 4, 4))
    assert sum(math.prod(s) for s in model.z_shapes) == model.num_dims == 3072


def test_sampling_shapes_and_temperature() -> None:
    model = tiny_glow()
    for t in (0.0, 0.7, 1.0):
        x = model.sample(5, temperature=t)
        assert x.shape == (5, *model.image_shape)
        assert torch.isfinite(x).all()
    gen = torch.Generator().manual_seed(1)
    zs = model.sample_latents(4000, temperature=0.5, generator=gen)
    assert abs(torch.cat([z.flatten() for z in zs]).std().item() - 0.5) < 0.01
    assert all(torch.equal(z, torch.zeros_like(z)) for z in model.sample_latents(2, temperature=0.0))


def test_conditional_sampling_needs_labels() -> None:
    model = tiny_glow(num_classes=3)
    assert model.sample(3, y=torch.tensor([0, 1, 2])).shape == (3, *model.image_shape)
    with pytest.raises(ValueError, match="pass labels y"):
        model.sample(3)


def test_train_and_eval_give_the_same_log_prob() -> None:
    model = tiny_glow()
    x = torch.rand(4, *model.image_shape, dtype=torch.float64) - 0.5
    train_lp = model.train().log_prob(x)
    torch.testing.assert_close(model.eval().log_prob(x), train_lp, rtol=0, atol=0)


def test_state_dict_keeps_actnorm_initialised(tmp_path) -> None:
    model = tiny_glow()
    path = tmp_path / "glow.pt"
    torch.save(model.state_dict(), path)
    fresh = Glow(**TINY).double().train()
    fresh.load_state_dict(torch.load(path))
    x = torch.rand(4, *model.image_shape, dtype=torch.float64) - 0.5
    # In train mode an uninitialised ActNorm would re-initialise from this batch and change log_prob.
    torch.testing.assert_close(fresh.log_prob(x), model.log_prob(x), rtol=0, atol=0)
    flags = [v for k, v in fresh.state_dict().items() if k.endswith("initialized")]
    assert len(flags) == 2 * TINY["steps"] and all(bool(f) for f in flags)


def test_every_parameter_gets_a_gradient() -> None:
    model = tiny_glow(num_classes=3)
    x = torch.rand(6, *model.image_shape, dtype=torch.float64) - 0.5
    y = torch.arange(6) % 3
    out = model.evaluate(x, y)
    loss = -out.log_prob.mean() + torch.nn.functional.cross_entropy(out.class_logits, y)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("step", ["glow", "realnvp", "nice"])
def test_memory_formats_give_the_same_model(step: str) -> None:
    coupling = "additive" if step == "nice" else "affine"
    kwargs = dict(architecture=step, coupling=coupling, image_shape=(2, 8, 8), levels=2, steps=2, hidden_channels=8)
    fast = tiny_glow(memory_format="channels_last", **kwargs)
    plain = Glow(memory_format="contiguous", **{**TINY, **kwargs}).double()
    plain.load_state_dict(fast.state_dict())
    stored = []
    for layer in fast.modules():
        if isinstance(layer, torch.nn.Conv2d):
            layer.register_forward_pre_hook(lambda _, args: stored.append(args[0].stride(1) == 1))
    x = torch.rand(3, 2, 8, 8, dtype=torch.float64) - 0.5
    outs = [model.evaluate(x) for model in (fast, plain)]
    assert stored and all(stored), "every coupling convolution should see channels-last activations"
    for a, b in zip(outs[0].zs, outs[1].zs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outs[0].log_prob, outs[1].log_prob, rtol=1e-12, atol=1e-10)
    grads = [
        torch.autograd.grad(out.log_prob.sum(), list(model.parameters()))
        for out, model in zip(outs, (fast, plain), strict=True)
    ]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    zs = fast.sample_latents(2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fast.decode(zs), plain.decode(zs), rtol=1e-10, atol=1e-12)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="memory_format='nhwc'"):
        Glow(**TINY, memory_format="nhwc")
    with pytest.raises(ValueError, match="coupling='affin'"):
        Glow(**TINY, coupling="affin")
    with pytest.raises(ValueError, match="permutation='LU'"):
        Glow(**TINY, permutation="LU")
    with pytest.raises(ValueError, match="divisible by 2\\*\\*levels"):
        Glow(image_shape=(1, 8, 8), levels=4, steps=1, hidden_channels=4)
    model = Glow(**TINY)
    with pytest.raises(ValueError, match="expected images of shape"):
        model.log_prob(torch.zeros(1, 3, 4, 4))
