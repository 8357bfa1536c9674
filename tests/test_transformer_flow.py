"""The transformer autoregressive flow (TarFlow): exact inverse, log-determinant, causality, sampling."""

import math

import pytest
import torch
from torch import nn

from glowlab.flows.transformer import AutoregressiveBlock, CausalTransformer, patchify, unpatchify
from glowlab.models.multiscale import MultiscaleConfig
from glowlab.models.transformer import TransformerFlow

SHAPE = (2, 4, 4)  # 4 patches of 2 x 2 x 2 = 8 values
CLASSES = 3


def randomised(module: nn.Module, scale: float = 0.2, seed: int = 0) -> nn.Module:
    """Add noise to every parameter: the zero-initialised output projections would make every block the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def model(num_classes: int | None = None, perturb: bool = True, **options) -> TransformerFlow:
    """A small float64 TarFlow with random weights."""
    options = {"steps": 3, "hidden_channels": 16, "heads": 2, "layers_per_block": 1, **options}
    config = MultiscaleConfig(
        image_shape=SHAPE, architecture="transformer", patch_size=2, num_classes=num_classes, **options
    )
    flow = TransformerFlow(config).double()
    return randomised(flow) if perturb else flow


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 0.5


def labels(n: int = 3) -> torch.Tensor:
    # Every class and the null label among them.
    return torch.arange(n) % (CLASSES + 1)


def test_patchify_is_inverted_by_unpatchify_and_keeps_patches_together() -> None:
    x = torch.randn(2, 3, 4, 6)
    seq = patchify(x, 2)
    assert seq.shape == (2, 6, 12)
    assert torch.equal(unpatchify(seq, 2, (3, 4, 6)), x)
    assert torch.equal(seq[:, 4], x[:, :, 2:4, 2:4].reshape(2, 12))  # row 1, column 1 of the 2 x 3 patch grid


def test_a_new_model_is_the_identity() -> None:
    flow = model(CLASSES, perturb=False)
    x, y = images(), labels()
    (z,), logdet = flow.encode(x, y)
    torch.testing.assert_close(z, x)
    torch.testing.assert_close(logdet, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("num_classes", [None, CLASSES], ids=["unconditional", "conditional"])
def test_decode_inverts_encode(num_classes: int | None) -> None:
    flow = model(num_classes)
    x = images()
    y = labels() if num_classes else None
    out = flow.evaluate(x, y)
    assert out.zs[0].shape == x.shape and out.logdet.shape == (3,) and out.class_logits is None
    assert not torch.allclose(out.zs[0], x)
    torch.testing.assert_close(flow.decode(out.zs, y), x, rtol=0, atol=1e-10)
    torch.testing.assert_close(flow(x, y)[0][0], out.zs[0])


@pytest.mark.parametrize("num_classes", [None, CLASSES], ids=["unconditional", "conditional"])
def test_logdet_matches_the_brute_force_jacobian(num_classes: int | None) -> None:
    flow = model(num_classes)
    x = images(2)
    y = labels(2) if num_classes else None
    _, logdet = flow.encode(x, y)
    for b in range(2):
        label = None if y is None else y[b : b + 1]

        def flat(v: torch.Tensor, label: torch.Tensor | None = label) -> torch.Tensor:
            return flow.encode(v.reshape(1, *SHAPE), label)[0][0].reshape(-1)

        jacobian = torch.autograd.functional.jacobian(flat, x[b].reshape(-1))
        sign, logabsdet = torch.linalg.slogdet(jacobian)
        assert sign > 0  # exp(-alpha) > 0 on a triangular Jacobian (in the block's patch order)
        torch.testing.assert_close(logdet[b], logabsdet, rtol=1e-9, atol=1e-9)
    z = flow.evaluate(x, y).zs[0]
    normal = -0.5 * (z**2).sum((1, 2, 3)) - 0.5 * z[0].numel() * math.log(2 * math.pi)
    torch.testing.assert_close(flow.log_prob(x, y), normal + logdet)


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_cached_inverse_equals_the_full_recomputation(guidance: float) -> None:
    flow = model(CLASSES)
    z, y = flow.sample_latents(3)[0], labels()
    cached = flow.decode([z], y, guidance=guidance, cache=True)
    torch.testing.assert_close(flow.decode([z], y, guidance=guidance, cache=False), cached, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cache", [True, False])
def test_the_cache_processes_each_token_once(cache: bool) -> None:
    block = randomised(AutoregressiveBlock(4, 5, 16, 2, 1)).double()
    seen: list[int] = []
    block.transformer.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    block.inverse(torch.randn(2, 5, 4, dtype=torch.float64), cache=cache)
    assert sum(seen) == (5 if cache else 1 + 2 + 3 + 4 + 5)


def test_incremental_decoding_matches_the_causal_pass() -> None:
    transformer = randomised(CausalTransformer(16, 2, 2)).double()
    tokens = torch.randn(2, 6, 16, dtype=torch.float64)
    cache = transformer.new_cache()
    # Two tokens, then one at a time: chunks of any size attend to the cache and causally among themselves.
    pieces = [transformer(tokens[:, :2], cache)] + [transformer(tokens[:, i : i + 1], cache) for i in range(2, 6)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), transformer(tokens), rtol=0, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
def test_block_is_causal_in_its_patch_order(reverse: bool) -> None:
    n, d = 5, 3
    block = randomised(AutoregressiveBlock(d, n, 16, 2, 2, num_classes=CLASSES, reverse=reverse)).double()
    x, y = torch.randn(2, n, d, dtype=torch.float64), torch.tensor([1, CLASSES])
    z, _ = block(x, y)
    for i in range(n):
        changed = x.clone()
        changed[:, i] += 1.0
        moved = (block(changed, y)[0] - z).abs().amax(dim=(0, 2))
        later = [j for j in range(n) if (j < i if reverse else j > i)]
        earlier = [j for j in range(n) if j not in later and j != i]
        assert torch.all(moved[earlier] == 0), (i, moved)
        assert torch.all(moved[later] > 1e-6) and moved[i] > 0, (i, moved)
    # The Jacobian is triangular with a diagonal diagonal block: patch i's own values are only scaled.
    jacobian = torch.autograd.functional.jacobian(lambda v: block(v, y[:1])[0][0], x[:1])[:, :, 0]  # (n, d, n, d)
    order = list(reversed(range(n))) if reverse else list(range(n))
    for a, i in enumerate(order):
        for j in order[a + 1 :]:
            assert torch.all(jacobian[i, :, j] == 0)
        diagonal = jacobian[i, :, i]
        torch.testing.assert_close(diagonal, torch.diag(torch.diagonal(diagonal)))


def test_block_inverse_with_logdet_is_minus_the_forward_logdet() -> None:
    block = randomised(AutoregressiveBlock(4, 5, 16, 2, 1, num_classes=CLASSES, reverse=True)).double()
    z, y = torch.randn(3, 5, 4, dtype=torch.float64), torch.tensor([0, 2, CLASSES])
    x, logdet = block.inverse_with_logdet(z, y)
    back, forward_logdet = block(x, y)
    torch.testing.assert_close(back, z, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, -forward_logdet)


def test_guidance_zero_is_the_conditional_inverse_and_guidance_changes_samples() -> None:
    flow = model(CLASSES)
    z, y = flow.sample_latents(3)[0], torch.tensor([0, 1, 2])
    conditional = flow.decode([z], y)
    assert torch.equal(flow.decode([z], y, guidance=0.0), conditional)
    guided = flow.decode([z], y, guidance=2.0)
    assert torch.isfinite(guided).all()
    assert (guided - conditional).abs().amax() > 1e-3
    # The null label is its own unconditional model: guiding it away from itself changes nothing.
    null = torch.full((3,), CLASSES)
    torch.testing.assert_close(flow.decode([z], null, guidance=2.0), flow.decode([z], null), rtol=0, atol=1e-12)


def test_guidance_of_an_unconditional_model_is_refused() -> None:
    with pytest.raises(ValueError, match="class-conditional"):
        model().decode(model().sample_latents(2), guidance=1.0)


def test_drop_labels_uses_the_null_label_at_the_configured_rate() -> None:
    flow = model(CLASSES, label_dropout=0.25)
    y = torch.randint(0, CLASSES, (20000,), generator=torch.Generator().manual_seed(0))
    dropped = flow.drop_labels(y, torch.Generator().manual_seed(1))
    changed = dropped != y
    assert torch.all(dropped[changed] == CLASSES)
    assert abs(changed.double().mean().item() - 0.25) < 0.015
    assert torch.equal(dropped, flow.drop_labels(y, torch.Generator().manual_seed(1)))
    assert flow.log_prob(images(2), dropped[:2]).shape == (2,)  # the null label is a valid input
    with pytest.raises(ValueError, match="class-conditional"):
        model().drop_labels(y)


@pytest.mark.parametrize("num_classes", [None, CLASSES], ids=["unconditional", "conditional"])
def test_sampling_at_temperature_zero_is_deterministic_and_finite(num_classes: int | None) -> None:
    flow = model(num_classes, noise_std=0.05)
    y = labels() if num_classes else None
    first = flow.sample(3, temperature=0.0, y=y)
    assert first.shape == (3, *SHAPE) and torch.isfinite(first).all()
    assert torch.equal(first, flow.sample(3, temperature=0.0, y=y))
    assert not first.requires_grad
    samples = flow.sample(3, y=y, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(samples).all()
    assert all(p.grad is None for p in flow.parameters())


@pytest.mark.parametrize("num_classes", [None, CLASSES], ids=["unconditional", "conditional"])
def test_denoising_is_one_score_step(num_classes: int | None) -> None:
    flow = model(num_classes, noise_std=0.1)
    y = labels() if num_classes else None
    raw = flow.sample(3, y=y, generator=torch.Generator().manual_seed(0), denoise=False)
    denoised = flow.sample(3, y=y, generator=torch.Generator().manual_seed(0), denoise=True)
    x = raw.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(flow.log_prob(x, y).sum(), x)
    assert score.abs().amax() > 1e-3
    torch.testing.assert_close(denoised - raw, 0.1**2 * score, rtol=1e-9, atol=1e-12)
    with torch.inference_mode():  # as a caller's evaluation loop may run it
        inside = flow.sample(3, y=y, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(inside, denoised, rtol=0, atol=1e-12)


def test_no_denoising_without_training_noise() -> None:
    flow = model(noise_std=0.0)
    raw = flow.sample(3, generator=torch.Generator().manual_seed(0), denoise=False)
    assert torch.equal(flow.sample(3, generator=torch.Generator().manual_seed(0), denoise=True), raw)


def test_state_dict_round_trip() -> None:
    flow = model(CLASSES)
    copy = TransformerFlow(flow.config).double()
    copy.load_state_dict(flow.state_dict())
    x, y = images(), labels()
    torch.testing.assert_close(copy.log_prob(x, y), flow.log_prob(x, y), rtol=0, atol=0)


def test_backward_gives_finite_gradients_for_every_parameter() -> None:
    flow = model(CLASSES)
    x, y = images(4), torch.tensor([0, 1, 2, CLASSES])
    (-flow.log_prob(x, y).mean()).backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_interface_of_the_multiscale_flows() -> None:
    flow = model(CLASSES)
    assert flow.z_shapes == (SHAPE,) and flow.num_dims == 32 and flow.initialized
    assert flow.num_classes == CLASSES and flow.n_bins == 256 and flow.image_shape == SHAPE
    assert [block.reverse for block in flow.blocks] == [False, True, False]
    assert [z.shape for z in flow.sample_latents(2)] == [(2, *SHAPE)]
    with pytest.raises(ValueError, match="architecture='transformer'"):
        TransformerFlow(MultiscaleConfig(image_shape=SHAPE, levels=1))


def test_bad_shapes_and_missing_labels_are_refused() -> None:
    conditional = model(CLASSES)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 2, 4, 4\)"):
        conditional.log_prob(torch.zeros(2, 1, 4, 4, dtype=torch.float64), labels(2))
    with pytest.raises(ValueError, match="pass labels"):
        conditional.log_prob(images(2))
    with pytest.raises(ValueError, match="pass labels"):
        conditional.sample(2)
    with pytest.raises(ValueError, match="1 latent"):
        conditional.decode(conditional.sample_latents(2) * 2, labels(2))
