"""Memory-saving invertible backprop gives the gradients and training of standard backprop."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import perturb

from glowlab.flows import Flow
from glowlab.flows.invertible import invertible_forward
from glowlab.models import Glow

TINY = dict(image_shape=(2, 8, 8), levels=3, steps=2, hidden_channels=8)


def pair(**kwargs) -> tuple[Glow, Glow]:
    torch.manual_seed(0)
    standard = Glow(**{**TINY, **kwargs}).double()
    standard.log_prob(torch.rand(8, *standard.image_shape, dtype=torch.float64) - 0.5, _y(8, standard))
    perturb(standard)
    invertible = copy.deepcopy(standard)
    invertible.config = dataclasses.replace(invertible.config, backprop="invertible")
    return standard, invertible


def _y(n: int, model: Glow) -> torch.Tensor | None:
    return torch.arange(n) % model.num_classes if model.num_classes else None


def loss_of(model: Glow, x: torch.Tensor) -> torch.Tensor:
    out = model.evaluate(x, _y(len(x), model))
    loss = -out.log_prob.mean()
    if out.class_logits is not None:
        loss = loss + torch.nn.functional.cross_entropy(out.class_logits, _y(len(x), model))
    return loss


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(coupling="additive", permutation="conv"),
        dict(num_classes=3),
        dict(permutation="shuffle"),
        dict(architecture="realnvp", permutation="reverse"),
        dict(architecture="nice", coupling="additive", levels=1, learn_top=False),
    ],
    ids=["affine-lu", "additive-conv", "conditional", "shuffle", "realnvp", "nice"],
)
def test_gradients_equal_standard_backprop_float64(kwargs: dict) -> None:
    standard, invertible = pair(**kwargs)
    x = (torch.rand(4, *standard.image_shape, dtype=torch.float64) - 0.5).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    loss_a, loss_b = loss_of(standard, x), loss_of(invertible, x2)
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-12)
    loss_a.backward()
    loss_b.backward()
    for (name, a), b in zip(standard.named_parameters(), invertible.parameters(), strict=True):
        err = (a.grad - b.grad).norm() / a.grad.norm().clamp_min(1e-300)
        assert err < 1e-8, (name, err.item())
    assert (x.grad - x2.grad).norm() / x.grad.norm() < 1e-8


def test_parameters_after_optimizer_steps_match() -> None:
    standard, invertible = pair()
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (standard, invertible)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.rand(4, *standard.image_shape, generator=gen, dtype=torch.float64) - 0.5
        for model, opt in zip((standard, invertible), optimizers, strict=True):
            opt.zero_grad()
            loss_of(model, x).backward()
            opt.step()
    for (name, a), b in zip(standard.named_parameters(), invertible.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_actnorm_initialises_the_same_way_in_both_modes() -> None:
    torch.manual_seed(0)
    a = Glow(**TINY).double()
    b = copy.deepcopy(a)
    b.config = dataclasses.replace(b.config, backprop="invertible")
    x = torch.rand(8, *a.image_shape, dtype=torch.float64) - 0.5
    loss_of(a, x).backward()
    loss_of(b, x).backward()
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_autocast_bfloat16_matches_standard_and_keeps_logdet_in_float32() -> None:
    """The rebuilt inputs run the networks in bfloat16 as the forward pass did (see
    glowlab.flows.precision): the gradients are standard backprop's to float32 rounding."""
    torch.manual_seed(0)
    standard = Glow(**TINY)
    x = torch.rand(8, *standard.image_shape) - 0.5
    standard.log_prob(x)
    perturb(standard, scale=0.02)
    invertible = copy.deepcopy(standard)
    invertible.config = dataclasses.replace(invertible.config, backprop="invertible")
    grads = []
    for model in (standard, invertible):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, logdet = model.encode(x)
            loss = -model.log_prob(x).mean()
        assert logdet.dtype == torch.float32 and loss.dtype == torch.float32
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert ((grads[0] - grads[1]).norm() / grads[0].norm()).item() < 1e-5


def test_bad_configurations_are_named() -> None:
    with pytest.raises(ValueError, match="backprop='low'"):
        Glow(**TINY, backprop="low")

    class NoInverse(Flow):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2, x.new_zeros(len(x))

    with pytest.raises(TypeError, match="NoInverse has no inverse"):
        invertible_forward([NoInverse()], torch.zeros(2, 3, requires_grad=True))


def test_no_graph_without_gradients() -> None:
    _, invertible = pair()
    with torch.no_grad():
        lp = invertible.log_prob(torch.rand(2, *invertible.image_shape, dtype=torch.float64) - 0.5)
    assert not lp.requires_grad
