"""Under autocast a multiscale flow runs its coupling networks in bfloat16 and its data path in float32.

Without the split, autocast also rounds Glow's 1x1 convolutions (and the LU product behind their
weights) to bfloat16: the log-determinant, computed from the float32 parameters, is then not that
of the map applied (0.017 to 0.15 nats apart on these tiny models, against 0.0015 at most with
the split), and decode no longer undoes encode (1e-2 apart).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import per_example_slogdet, perturb
from torch.utils._python_dispatch import TorchDispatchMode

from glowlab.flows.nn import network_kernels
from glowlab.flows.precision import network_state, networks_under
from glowlab.models import Glow
from glowlab.models.multiscale import FlowStep

TINY = dict(image_shape=(2, 8, 8), levels=3, steps=2, hidden_channels=8)
VARIANTS = {
    "glow-lu": dict(permutation="lu"),
    "glow-conv": dict(permutation="conv"),
    "glow-shuffle": dict(permutation="shuffle"),
    "glow-additive": dict(coupling="additive"),
    "realnvp": dict(architecture="realnvp"),
    "nice": dict(architecture="nice"),
}


def trained_like(**options) -> tuple[Glow, torch.Tensor]:
    """A tiny model with ActNorm initialised and perturbed weights, and a batch for it."""
    torch.manual_seed(0)
    model = Glow(**TINY, **options)
    x = torch.rand(4, *model.image_shape) - 0.5
    model.log_prob(x)
    with torch.no_grad():
        perturb(model, scale=0.05)
    return model, x


def bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_the_log_determinant_under_autocast_is_that_of_the_map(options: dict) -> None:
    model, x = trained_like(**options)

    def encode(v: torch.Tensor) -> list[torch.Tensor]:
        with bf16():
            return model.encode(v)[0]

    with bf16():
        zs, logdet = model.encode(x)
    assert logdet.dtype == torch.float32 and all(z.dtype == torch.float32 for z in zs)
    # Autograd's Jacobian goes through the bfloat16 networks' backward: ~1e-3 of noise at ~160 nats.
    torch.testing.assert_close(per_example_slogdet(encode, x), logdet, atol=5e-3, rtol=0)


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_decode_undoes_encode_under_autocast(options: dict) -> None:
    model, x = trained_like(**options)
    with torch.no_grad(), bf16():
        restored = model.decode(model.encode(x)[0])
    assert restored.dtype == torch.float32
    torch.testing.assert_close(restored, x, atol=1e-5, rtol=0)
    assert network_state() is None  # nothing of the autocast state outlives the call


class _Calls(TorchDispatchMode):
    """What ``describe(args, kwargs)`` says of every dispatched call of ``op``."""

    def __init__(self, op, describe: Callable[[tuple, dict], tuple]) -> None:
        super().__init__()
        self.op, self.describe = op, describe
        self.seen: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is self.op:
            self.seen.append(self.describe(args, kwargs))
        return func(*args, **kwargs)


def convolution_dtypes() -> _Calls:
    """The input dtype of every convolution, by the kernel's size (1x1 mixing or 3x3 network)."""
    return _Calls(torch.ops.aten.convolution.default, lambda args, kwargs: (args[1].shape[-1], args[0].dtype))


def casts() -> _Calls:
    """The dtype conversions, by the converted tensor's number of dimensions and target dtype."""
    return _Calls(torch.ops.aten._to_copy.default, lambda args, kwargs: (args[0].dim(), kwargs.get("dtype")))


def test_only_the_coupling_networks_run_in_bfloat16() -> None:
    """The speed of mixed precision stays: every convolution of a coupling network (3x3 in, 1x1
    hidden, 3x3 out) runs in bfloat16, the 1x1 mixing convolutions and the learned priors in float32."""
    model, x = trained_like(permutation="lu")
    with convolution_dtypes() as mode, bf16():
        model.log_prob(x)
    steps = TINY["levels"] * TINY["steps"]
    network = [dtype for size, dtype in mode.seen if dtype == torch.bfloat16]
    assert len(network) == 3 * steps
    mixing = [size for size, dtype in mode.seen if dtype == torch.float32 and size == 1]
    assert len(mixing) == steps
    priors = [size for size, dtype in mode.seen if dtype == torch.float32 and size == 3]
    assert len(priors) == TINY["levels"] - 1  # the splits' learned priors (the top's is off by default)


def test_a_level_casts_its_networks_weights_once() -> None:
    """Autocast would cast every network's weights and biases at every step; a level casts each
    kind once for its K steps (stacked), and each step only its network's input and output."""
    levels, steps = 3, 4
    torch.manual_seed(0)
    model = Glow(image_shape=(2, 8, 8), levels=levels, steps=steps, hidden_channels=8)
    x = torch.rand(4, *model.image_shape) - 0.5
    model.log_prob(x)
    with casts() as mode, bf16():
        model.log_prob(x)
    assert mode.seen.count((5, torch.bfloat16)) == 3 * levels  # (K, out, in, k, k): the three convolutions
    assert mode.seen.count((2, torch.bfloat16)) == 3 * levels  # (K, out): their biases
    assert mode.seen.count((4, torch.bfloat16)) == levels * steps  # each network's input
    assert mode.seen.count((4, torch.float32)) == levels * steps  # and its output, back to the data path
    assert len(mode.seen) == 6 * levels + 2 * levels * steps


@pytest.mark.parametrize("coupling", ["affine", "additive", "checkerboard"])
def test_weights_cast_once_give_what_autocast_gives(coupling: str) -> None:
    """A coupling run with its level's stacked, cast kernels computes autocast's own values and gradients."""
    model, _ = trained_like(coupling=coupling)
    steps = [layer for layer in model.levels[0].layers if isinstance(layer, FlowStep)]
    nets = [step.layers[2].net for step in steps]
    x = torch.rand(4, 4 * model.image_shape[0], 4, 4) - 0.5  # what the level's steps see after the squeeze
    for k, step in enumerate(steps):
        results = []
        for cast_once in (False, True):
            model.zero_grad()
            with networks_under(("cpu", torch.bfloat16, True)):
                kernels = network_kernels(nets, torch.bfloat16)[k] if cast_once else None
                y, logdet = step.layers[2](x, None, kernels=kernels)
            (y.square().sum() + logdet.sum()).backward()
            results.append([y, logdet, *(p.grad.clone() for p in step.parameters() if p.grad is not None)])
        assert len(results[1]) == len(results[0]) > 2
        for ours, autocasts in zip(*results, strict=True):
            torch.testing.assert_close(ours, autocasts, rtol=0, atol=0)
