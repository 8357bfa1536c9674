"""Flows over vectors: a named family of layers over a standard normal base density."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from glowlab.flows.autoregressive import IAF, MAF
from glowlab.flows.base import Flow, FlowSequence, choose, standard_normal_log_prob
from glowlab.flows.continuous import CNF
from glowlab.flows.elementwise import ElementwiseAffine, ElementwiseSpline, LeakyReLU, PiecewiseLinear
from glowlab.flows.linear import LULinear
from glowlab.flows.planar import Planar, Radial
from glowlab.flows.residual import AdditiveResidual, InvertibleResidual
from glowlab.flows.standardize import Standardize
from glowlab.flows.vector_coupling import VectorCoupling


@dataclass(frozen=True)
class Family:
    """How a family stacks its layers: the layer class, fixed options, and what goes between.

    ``alternate`` names a constructor option that alternates between two values from one layer to
    the next, so every coordinate gets transformed (the autoregressive order, the coupling mask).
    ``lu`` puts an LU linear layer before every layer and after the last (elementwise families mix
    nothing on their own). ``final_scale`` ends the stack with a learned diagonal affine map, for
    families that keep the volume or cannot rescale globally.

    References: Papamakarios et al., "Normalizing Flows for Probabilistic Modeling and Inference", JMLR 2021.
    """

    layer: Callable[..., Flow]
    preset: dict[str, Any] = field(default_factory=dict)
    alternate: tuple[str, tuple[Any, Any]] | None = None
    lu: bool = False
    final_scale: bool = False


ORDER = ("order", ("natural", "reversed"))
PARITY = ("parity", (0, 1))

FAMILIES: dict[str, Family] = {
    "maf": Family(MAF, {"transformer": "affine"}, ORDER),
    "maf-spline": Family(MAF, {"transformer": "spline"}, ORDER),
    "iaf": Family(IAF, {"transformer": "affine"}, ORDER),
    "iaf-spline": Family(IAF, {"transformer": "spline"}, ORDER),
    "realnvp": Family(VectorCoupling, {"transformer": "affine"}, PARITY),
    "nice": Family(VectorCoupling, {"transformer": "additive"}, PARITY, final_scale=True),
    "spline-coupling": Family(VectorCoupling, {"transformer": "spline"}, PARITY),
    "lu-spline": Family(ElementwiseSpline, lu=True),
    "lu-piecewise": Family(PiecewiseLinear, lu=True),
    "lu-leakyrelu": Family(LeakyReLU, lu=True),
    "iresnet": Family(InvertibleResidual, final_scale=True),
    "irevnet": Family(AdditiveResidual, final_scale=True),
    "cnf": Family(CNF),
    "planar": Family(Planar),
    "radial": Family(Radial),
}

# The family names as a type, so that `glowlab density fit --help` lists them and the parser refuses
# others; FAMILIES stays the source of truth (tests/test_help.py checks the two name the same families).
FamilyName = Literal[
    "maf",
    "maf-spline",
    "iaf",
    "iaf-spline",
    "realnvp",
    "nice",
    "spline-coupling",
    "lu-spline",
    "lu-piecewise",
    "lu-leakyrelu",
    "iresnet",
    "irevnet",
    "cnf",
    "planar",
    "radial",
]

# Arguments the builder passes to every layer class that accepts them.
_COMMON = ("features", "hidden_features", "hidden_layers")


def _accepted(layer: Callable[..., Flow]) -> set[str]:
    return {name for name in inspect.signature(layer).parameters if name not in ("self", "generator")}


def make_vector_flow(
    family: str,
    features: int,
    layers: int = 4,
    hidden_features: int = 64,
    hidden_layers: int = 2,
    options: dict[str, Any] | None = None,
) -> FlowSequence:
    """``layers`` layers of ``family`` on ``features``-dimensional vectors.

    ``options`` go to every layer of the family (for example ``bins`` for splines, ``lipschitz``
    and ``logdet`` for iResNet, ``divergence`` and ``adjoint`` for CNF); an option the family's
    layer does not take is an error naming it.
    """
    spec = choose("family", family, FAMILIES)
    if features < 1 or layers < 1:
        raise ValueError(f"features and layers must be >= 1, got features={features}, layers={layers}")
    accepted = _accepted(spec.layer)
    options = dict(options or {})
    fixed = set(spec.preset) | ({spec.alternate[0]} if spec.alternate else set())
    for name in options:
        if name not in accepted or name in fixed or name in _COMMON:
            allowed = sorted(accepted - fixed - set(_COMMON))
            raise ValueError(
                f"family {family!r} has no option {name!r}"
                + (f" (its options: {', '.join(allowed)})" if allowed else " (it takes no options)")
            )
    common = {"features": features, "hidden_features": hidden_features, "hidden_layers": hidden_layers}
    kwargs = {k: v for k, v in common.items() if k in accepted} | spec.preset | options
    flows: list[Flow] = []
    for i in range(layers):
        if spec.lu:
            flows.append(LULinear(features))
        if spec.alternate is not None:
            name, values = spec.alternate
            kwargs[name] = values[i % 2]
        flows.append(spec.layer(**kwargs))
    if spec.lu:
        flows.append(LULinear(features))
    if spec.final_scale:
        flows.append(ElementwiseAffine(features))
    return FlowSequence(flows)


@dataclass(frozen=True)
class VectorFlowConfig:
    """Everything that defines a vector flow of the density lab, its data standardisation included.

    ``family``, ``layers``, ``hidden_features``, ``hidden_layers`` and ``options`` go to
    :func:`make_vector_flow`; ``mean`` and ``std`` (per feature, from the training data) make the
    flow's first layer a standardisation, so likelihoods are in the data's own units. ``glowlab
    density fit`` fills ``features``, ``mean`` and ``std`` from the data.

    References: Papamakarios et al., "Normalizing Flows for Probabilistic Modeling and Inference", JMLR 2021.
    """

    features: int = 2
    family: FamilyName = "maf"
    layers: int = 5
    hidden_features: int = 64
    hidden_layers: int = 2
    options: dict[str, Any] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None

    def __post_init__(self) -> None:
        choose("family", self.family, FAMILIES)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.features:
                raise ValueError(f"{name} has {len(value)} values for features={self.features}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON-ready): the config as stored in exported models."""
        return dataclasses.asdict(self)


# Checkpoints hold the config: let torch.load(weights_only=True) (Lightning's resume) read it.
torch.serialization.add_safe_globals([VectorFlowConfig])


class FlowModel(nn.Module):
    """A flow over vectors with a standard normal base: ``log p(x) = log N(f(x); 0, I) + log|det df/dx|``.

    ``flow`` maps data to latents (``forward(x) -> (z, logdet)``); sampling runs its inverse.
    ``sample_with_log_prob`` returns samples together with their log-density from the same pass,
    which is what reverse-KL training needs and is cheap for IAF, planar, radial and CNF layers.

    References: Papamakarios et al., "Normalizing Flows for Probabilistic Modeling and Inference", JMLR 2021.
    """

    def __init__(self, flow: Flow, features: int, config: VectorFlowConfig | None = None) -> None:
        super().__init__()
        self.flow = flow
        self.features = features
        self.config = config

    @classmethod
    def from_config(cls, config: VectorFlowConfig) -> FlowModel:
        """The standardisation of ``config`` followed by ``config.layers`` layers of its family."""
        body = make_vector_flow(
            config.family, config.features, config.layers, config.hidden_features, config.hidden_layers, config.options
        )
        features = config.features
        mean = config.mean if config.mean is not None else [0.0] * features
        standardize = Standardize(mean, config.std or [1.0] * features)
        return cls(FlowSequence([standardize, *body.layers]), features, config)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.features:
            raise ValueError(f"expected vectors of shape (B, {self.features}), got {tuple(x.shape)}")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, logdet)``: latents and ``log|det dz/dx|`` of shape (B,)."""
        self._check(x)
        return self.flow(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Same as :meth:`encode`."""
        return self.encode(x)

    def decode(self, z: Tensor) -> Tensor:
        """Exact inverse of :meth:`encode`."""
        self._check(z)
        return self.flow.inverse(z)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of ``x`` in nats, shape (B,)."""
        z, logdet = self.encode(x)
        return standard_normal_log_prob(z) + logdet

    def _base_sample(self, n: int, temperature: float, generator: torch.Generator | None) -> Tensor:
        p = next(self.parameters(), None)
        device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.get_default_dtype())
        return temperature * torch.randn(n, self.features, generator=generator, device=device, dtype=dtype)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples; ``temperature`` scales the base standard deviation."""
        return self.flow.inverse(self._base_sample(n, temperature, generator))

    def sample_with_log_prob(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` samples and their log-density, differentiable in the parameters (reparameterised)."""
        z = self._base_sample(n, 1.0, generator)
        x, logdet = self.flow.inverse_with_logdet(z)
        # log q(x) = log N(z) - log|det dx/dz|
        return x, standard_normal_log_prob(z) - logdet


def log_densities(model: FlowModel, x: Tensor, chunk: int = 4096) -> Tensor:
    """Log-density of every row of ``x`` (N, D) in nats, shape (N,), computed ``chunk`` rows at a time.

    Runs with autograd on (iResNet's and CNF's log-determinants differentiate the flow even when
    evaluating) but keeps no graph, so any N fits in memory.
    """
    with torch.enable_grad():
        return torch.cat([model.log_prob(part).detach() for part in x.split(chunk)])
