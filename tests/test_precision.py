"""Under autocast a multiscale flow runs its coupling networks in bfloat16 and its data path in float32.

Without the split, autocast also rounds Glow's 1x1 convolutions (and the LU product behind their
weights) to bfloat16: the log-determinant, computed from the float32 parameters, is then not that
of the map applied (0.017 to 0.15 nats apart on these tiny models, against 0.0015 at most with
the split), and decode no longer undoes encode (1e-2 apart).
"""

from __future__ import annotations

import pytest
import torch
from helpers import per_example_slogdet, perturb
from torch.utils._python_dispatch import TorchDispatchMode

from glowlab.flows.precision import network_state
from glowlab.models import Glow

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


class _ConvolutionDtypes(TorchDispatchMode):
    """The input dtype of every convolution, by the kernel's size (1x1 mixing or 3x3 network)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.seen.append((args[1].shape[-1], args[0].dtype))
        return func(*args, **(kwargs or {}))


def test_only_the_coupling_networks_run_in_bfloat16() -> None:
    """The speed of mixed precision stays: every convolution of a coupling network (3x3 in, 1x1
    hidden, 3x3 out) runs in bfloat16, the 1x1 mixing convolutions and the learned priors in float32."""
    model, x = trained_like(permutation="lu")
    with _ConvolutionDtypes() as mode, bf16():
        model.log_prob(x)
    steps = TINY["levels"] * TINY["steps"]
    network = [dtype for size, dtype in mode.seen if dtype == torch.bfloat16]
    assert len(network) == 3 * steps
    mixing = [size for size, dtype in mode.seen if dtype == torch.float32 and size == 1]
    assert len(mixing) == steps
    priors = [size for size, dtype in mode.seen if dtype == torch.float32 and size == 3]
    assert len(priors) == TINY["levels"] - 1  # the splits' learned priors (the top's is off by default)
