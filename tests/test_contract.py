"""The flow contract, one test over every flow layer and model: image, vector, residual, continuous.

For each entry of ``CONTRACT`` (float64, parameters moved off their identity initialisation):
``inverse`` undoes ``forward`` both ways; the log-determinant is the brute-force Jacobian's (both
directions, where it is exact); ``inverse_with_logdet`` agrees with ``inverse`` and that Jacobian;
a fresh instance loading the ``state_dict`` computes the same function; and a model exported as a
folder loads (``glowlab.load``) to the same log-densities. The specialised tests (initialisation,
estimators, solvers, spectral norms) stay in their own files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers import flat, per_example_slogdet, perturb
from torch import Tensor, nn

import glowlab
from glowlab.flows import (
    CNF,
    IAF,
    MAF,
    ActNorm,
    AdditiveCoupling,
    AdditiveResidual,
    AffineCoupling,
    CheckerboardCoupling,
    ElementwiseAffine,
    ElementwiseSpline,
    FlowSequence,
    InvConv1x1,
    InvConv1x1LU,
    InvertibleResidual,
    LeakyReLU,
    LULinear,
    PiecewiseLinear,
    Planar,
    Radial,
    Reverse,
    Shuffle,
    Split,
    Squeeze,
    Standardize,
    TopPrior,
    VectorCoupling,
)
from glowlab.flows.base import run_forward, run_inverse
from glowlab.flows.transformer import AutoregressiveBlock
from glowlab.models import FlowModel, FlowStep, ImageFlow, MultiscaleConfig, MultiscaleFlow, image_flow
from glowlab.models.density import VectorFlowConfig

DT = torch.float64


@dataclass
class Case:
    """One contract entry: how to build it and what it takes."""

    build: Callable[[], nn.Module]
    shape: tuple[int, ...]  # one example's shape
    scale: float = 1.0  # input spread
    context: Callable[[int], Tensor] | None = None  # batch size -> labels
    exact_logdet: bool = True
    tolerance: float = 1e-8


def _seeded(module: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    return perturb(module.to(DT), scale=scale, seed=seed)


def _initialised(module: nn.Module, shape: tuple[int, ...], context: Callable[[int], Tensor] | None = None):
    """Run one training batch so ActNorm layers initialise, then move the parameters off it."""
    module = module.to(DT).train()
    with torch.no_grad():
        if isinstance(module, MultiscaleFlow):  # images: values in [-0.5, 0.5)
            module.log_prob(torch.rand(16, *shape, dtype=DT) - 0.5, context(16) if context else None)
        else:
            run_forward(module, torch.randn(8, *shape, dtype=DT) * 2 + 0.5)
    return _seeded(module)


def _labels(n: int) -> Tensor:
    return torch.arange(n) % 3


def _glow(**options) -> Callable[[], MultiscaleFlow]:
    base = dict(image_shape=(2, 4, 4), levels=2, steps=2, hidden_channels=8)
    context = _labels if "num_classes" in options else None
    return lambda: _initialised(MultiscaleFlow(**{**base, **options}), (2, 4, 4), context)


def _transformer(**options) -> Callable[[], ImageFlow]:
    config = MultiscaleConfig(
        image_shape=(2, 4, 4), architecture="transformer", steps=2, hidden_channels=8, heads=2, layers_per_block=1
    )
    return lambda: _seeded(image_flow(MultiscaleConfig(**{**config.to_dict(), **options})), scale=0.2)


def _iresnet(logdet: str) -> InvertibleResidual:
    layer = InvertibleResidual(
        3, 16, logdet=logdet, tolerance=1e-12, max_iterations=200, generator=torch.Generator().manual_seed(0)
    )
    layer = _seeded(layer, scale=0.5)
    layer.converge(2000)
    return layer.eval()


def _vector_model(family: str, **options) -> Callable[[], FlowModel]:
    config = VectorFlowConfig(
        features=4,
        family=family,
        layers=2,
        hidden_features=16,
        hidden_layers=1,
        options=options or None,
        mean=[0.5, -1.0, 0.0, 2.0],
        std=[2.0, 0.5, 1.0, 3.0],
    )

    def build() -> FlowModel:
        model = _seeded(FlowModel.from_config(config), scale=0.3, seed=1)
        for layer in model.modules():
            if isinstance(layer, InvertibleResidual):
                layer.converge(2000)  # the perturbed weights' spectral norms, before the eval-mode inverse
        return model.eval()

    return build


CONTRACT: dict[str, Case] = {
    # image layers, (C, H, W) inputs
    "actnorm": Case(lambda: _initialised(ActNorm(4), (4, 4, 4)), (4, 4, 4)),
    "conv1x1": Case(lambda: _seeded(InvConv1x1(4)), (4, 4, 4)),
    "conv1x1-lu": Case(lambda: _seeded(InvConv1x1LU(4)), (4, 4, 4)),
    "reverse": Case(lambda: Reverse(4).to(DT), (4, 4, 4)),
    "shuffle": Case(lambda: Shuffle(4).to(DT), (4, 4, 4)),
    "affine-coupling": Case(lambda: _seeded(AffineCoupling(4, 8)), (4, 4, 4)),
    "affine-coupling-odd": Case(lambda: _seeded(AffineCoupling(5, 8)), (5, 4, 4)),
    "additive-coupling": Case(lambda: _seeded(AdditiveCoupling(4, 8)), (4, 4, 4)),
    "checkerboard-coupling": Case(lambda: _seeded(CheckerboardCoupling(4, 8, parity=0)), (4, 4, 4)),
    "checkerboard-coupling-odd": Case(lambda: _seeded(CheckerboardCoupling(5, 8, parity=1)), (5, 4, 4)),
    "squeeze": Case(lambda: Squeeze("contiguous"), (4, 4, 4)),
    "squeeze-channels-last": Case(lambda: Squeeze("channels_last"), (4, 4, 4)),
    "split": Case(lambda: _seeded(Split(4)), (4, 4, 4)),
    "split-conditional": Case(lambda: _seeded(Split(4, 3, (4, 4))), (4, 4, 4), context=_labels),
    "split-odd": Case(lambda: _seeded(Split(5)), (5, 4, 4)),
    "top-prior": Case(lambda: _seeded(TopPrior((4, 4, 4))), (4, 4, 4)),
    "top-prior-conditional": Case(lambda: _seeded(TopPrior((4, 2, 2), num_classes=3)), (4, 2, 2), context=_labels),
    "top-prior-position": Case(
        lambda: _seeded(TopPrior((4, 2, 2), num_classes=3, per_position=True)), (4, 2, 2), context=_labels
    ),
    "flow-step": Case(lambda: _initialised(FlowStep(4, 8, "affine", "lu"), (4, 4, 4)), (4, 4, 4)),
    "flow-step-checkerboard": Case(
        lambda: _initialised(FlowStep(4, 8, "checkerboard", "conv", 1), (4, 4, 4)), (4, 4, 4)
    ),
    "sequence": Case(lambda: _seeded(FlowSequence([Squeeze(), InvConv1x1LU(16), AffineCoupling(16, 8)])), (4, 4, 4)),
    "transformer-block": Case(lambda: _seeded(AutoregressiveBlock(4, 3, 8, 2, 1), scale=0.2), (3, 4)),
    "transformer-block-reversed-conditional": Case(
        lambda: _seeded(AutoregressiveBlock(4, 3, 8, 2, 1, num_classes=3, reverse=True), scale=0.2),
        (3, 4),
        context=_labels,
    ),
    "elementwise-affine-image": Case(lambda: _seeded(ElementwiseAffine((2, 2, 2)), 0.5, 1), (2, 2, 2), scale=2.5),
    # vector layers, (D,) inputs spread over and beyond the splines' bound
    "elementwise-affine": Case(lambda: _seeded(ElementwiseAffine(5), 0.5, 1), (5,), scale=2.5),
    "leaky-relu": Case(lambda: _seeded(LeakyReLU(0.3), 0.5, 1), (5,), scale=2.5),
    "piecewise-linear": Case(lambda: _seeded(PiecewiseLinear(5, bins=6, bound=3.0), 0.5, 1), (5,), scale=2.5),
    "elementwise-spline": Case(lambda: _seeded(ElementwiseSpline(5, bins=6, bound=3.0), 0.5, 1), (5,), scale=2.5),
    "lu-linear": Case(lambda: _seeded(LULinear(5), 0.5, 1), (5,), scale=2.5),
    "standardize": Case(lambda: Standardize([1.0, -2.0, 0.0], [2.0, 0.5, 3.0]).to(DT), (3,), scale=2.5),
    "maf-affine": Case(lambda: _seeded(MAF(5, 16, transformer="affine"), 0.5, 1), (5,), scale=2.5),
    "maf-spline": Case(
        lambda: _seeded(MAF(5, 16, transformer="spline", bins=5, order="reversed"), 0.5, 1), (5,), scale=2.5
    ),
    "iaf-affine": Case(lambda: _seeded(IAF(5, 16, transformer="affine", order="reversed"), 0.5, 1), (5,), scale=2.5),
    "iaf-spline": Case(lambda: _seeded(IAF(5, 16, transformer="spline", bins=5), 0.5, 1), (5,), scale=2.5),
    "coupling-affine": Case(lambda: _seeded(VectorCoupling(5, 16, transformer="affine"), 0.5, 1), (5,), scale=2.5),
    "coupling-additive": Case(
        lambda: _seeded(VectorCoupling(5, 16, transformer="additive", parity=1), 0.5, 1), (5,), scale=2.5
    ),
    "coupling-spline": Case(
        lambda: _seeded(VectorCoupling(5, 16, transformer="spline", bins=5), 0.5, 1), (5,), scale=2.5
    ),
    # residual and continuous layers
    "iresnet-exact": Case(lambda: _iresnet("exact"), (3,)),
    "iresnet-series": Case(lambda: _iresnet("series"), (3,), exact_logdet=False),
    "irevnet-even": Case(lambda: _seeded(AdditiveResidual(4, 8, generator=torch.Generator().manual_seed(0))), (4,)),
    "irevnet-odd": Case(lambda: _seeded(AdditiveResidual(5, 8, generator=torch.Generator().manual_seed(0))), (5,)),
    "planar": Case(lambda: _seeded(Planar(3), 1.0, 3), (3,)),
    "radial": Case(lambda: _seeded(Radial(5), 1.0, 4), (5,)),
    "cnf": Case(lambda: _seeded(CNF(3, hidden_features=16, adjoint=False, solver="rk4", step_size=0.01), 0.3, 1), (3,)),
    # models: image models over (C, H, W) in [-0.5, 0.5)-ish, vector models over (D,)
    "glow-lu": Case(_glow(), (2, 4, 4), scale=0.3),
    "glow-conv-conditional": Case(_glow(permutation="conv", num_classes=3), (2, 4, 4), scale=0.3, context=_labels),
    "glow-conditional-priors": Case(_glow(num_classes=3, conditioning="priors"), (2, 4, 4), scale=0.3, context=_labels),
    "glow-conditional-couplings": Case(
        _glow(num_classes=3, conditioning="couplings"), (2, 4, 4), scale=0.3, context=_labels
    ),
    "nice-conditional-couplings": Case(
        _glow(architecture="nice", coupling="additive", levels=1, num_classes=3, conditioning="couplings"),
        (2, 4, 4),
        scale=0.3,
        context=_labels,
    ),
    "realnvp-conditional-couplings": Case(
        _glow(architecture="realnvp", num_classes=3, conditioning="couplings"), (2, 4, 4), scale=0.3, context=_labels
    ),
    "glow-checkerboard": Case(_glow(coupling="checkerboard", permutation="shuffle"), (2, 4, 4), scale=0.3),
    "glow-fixed-top": Case(_glow(coupling="additive", permutation="reverse", learn_top=False), (2, 4, 4), scale=0.3),
    "realnvp": Case(_glow(architecture="realnvp"), (2, 4, 4), scale=0.3),
    "nice": Case(_glow(architecture="nice", coupling="additive", levels=1, learn_top=False), (2, 4, 4), scale=0.3),
    "transformer": Case(_transformer(), (2, 4, 4), scale=0.3),
    "transformer-conditional-patch1": Case(
        _transformer(num_classes=3, patch_size=1), (2, 4, 4), scale=0.3, context=_labels
    ),
    "vector-maf": Case(_vector_model("maf"), (4,), scale=2.0),
    "vector-spline-coupling": Case(_vector_model("spline-coupling", bins=5), (4,), scale=2.0),
    "vector-iresnet": Case(
        _vector_model("iresnet", logdet="exact", tolerance=1e-12, max_iterations=500), (4,), scale=2.0
    ),
}
MODELS = [name for name, case in CONTRACT.items() if isinstance(case.build(), ImageFlow | FlowModel)]


def inputs(case: Case, seed: int, n: int = 3) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return case.scale * torch.randn(n, *case.shape, generator=generator, dtype=DT)


def context_for(case: Case, n: int) -> Tensor | None:
    return case.context(n) if case.context else None


def forward(module: nn.Module, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
    """Data -> (latent as (B, D), log-determinant) for a layer or a model."""
    if isinstance(module, ImageFlow):
        zs, logdet = module.encode(x, context)
        return flat(zs), logdet
    if isinstance(module, FlowModel):
        return module.encode(x)
    return run_forward(module, x, context)


def inverse(module: nn.Module, y: Tensor, context: Tensor | None) -> Tensor:
    """Latent -> data: ``y`` is what :func:`forward` returned (flattened latents for image models)."""
    if isinstance(module, ImageFlow):
        parts, start = [], 0
        for shape in module.z_shapes:
            n = math.prod(shape)
            parts.append(y[:, start : start + n].reshape(y.shape[0], *shape))  # (B, n) -> (B, C, H, W)
            start += n
        return module.decode(parts, context)
    if isinstance(module, FlowModel):
        return module.decode(y)
    return run_inverse(module, y, context)


@pytest.mark.parametrize("name", list(CONTRACT))
def test_inverse_undoes_forward_both_ways(name: str) -> None:
    case = CONTRACT[name]
    module, x = case.build(), inputs(case, 0)
    context = context_for(case, len(x))
    y, logdet = forward(module, x, context)
    assert logdet.shape == (len(x),) and logdet.dtype == DT
    if y.shape == x.shape:  # parameters off their initialisation: the map is not the identity, so this bites
        assert (y - x).abs().max() > 1e-3
    assert (inverse(module, y, context) - x).abs().max() < case.tolerance
    z = torch.randn_like(y)
    assert (forward(module, inverse(module, z, context), context)[0] - z).abs().max() < case.tolerance


@pytest.mark.parametrize("name", [n for n, c in CONTRACT.items() if c.exact_logdet])
def test_logdet_is_the_jacobians_both_ways(name: str) -> None:
    case = CONTRACT[name]
    module, x = case.build(), inputs(case, 0, 2)
    context = context_for(case, len(x))
    _, logdet = forward(module, x, context)
    brute = per_example_slogdet(lambda v: forward(module, v, context)[0], x)
    torch.testing.assert_close(logdet, brute, rtol=1e-8, atol=1e-8)
    y = torch.randn_like(forward(module, x, context)[0]) * 0.5
    expected = -forward(module, inverse(module, y, context), context)[1]
    torch.testing.assert_close(
        per_example_slogdet(lambda v: inverse(module, v, context), y), expected, rtol=1e-8, atol=1e-8
    )


@pytest.mark.parametrize("name", [n for n in CONTRACT if n not in MODELS])
def test_inverse_with_logdet_is_the_inverse_and_its_logdet(name: str) -> None:
    case = CONTRACT[name]
    module, x = case.build(), inputs(case, 0)
    context = context_for(case, len(x))
    y = torch.randn_like(forward(module, x, context)[0]) * 0.5
    x_back, logdet = module.inverse_with_logdet(y, context) if module.conditional else module.inverse_with_logdet(y)
    if not case.exact_logdet:
        logdet = logdet.detach()
    assert logdet.shape == (len(y),)
    torch.testing.assert_close(x_back, inverse(module, y, context), rtol=0, atol=1e-10)
    if case.exact_logdet:
        torch.testing.assert_close(logdet, -forward(module, x_back, context)[1], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", list(CONTRACT))
def test_state_dict_round_trip_gives_the_same_function(name: str) -> None:
    case = CONTRACT[name]
    module = case.build()
    with torch.random.fork_rng():
        torch.manual_seed(123)  # a fresh instance with other random parameters
        fresh = case.build()
        perturb(fresh, scale=0.2, seed=7)
    fresh.load_state_dict(module.state_dict())
    x = inputs(case, 1)
    context = context_for(case, len(x))
    outputs = zip(forward(module, x, context), forward(fresh, x, context), strict=True)
    for a, b in list(outputs)[: 2 if case.exact_logdet else 1]:  # a stochastic log-determinant differs per call
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_model_exports_and_loads_to_the_same_log_density(name: str, tmp_path) -> None:
    case = CONTRACT[name]
    model = case.build()
    from glowlab.models.io import save_model

    save_model(model, tmp_path / "model")
    loaded = glowlab.load(tmp_path / "model").to(DT)
    x = inputs(case, 2)
    context = context_for(case, len(x))
    if isinstance(model, ImageFlow):
        assert loaded.config == model.config
        torch.testing.assert_close(loaded.log_prob(x, context), model.log_prob(x, context), rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x), rtol=0, atol=1e-12)
