"""MADE: a feed-forward network whose outputs are autoregressive in its inputs, through masks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from glowlab.flows.base import check_option
from glowlab.flows.nn import MaskedLinear

ORDERS = ("natural", "reversed")


class MADE(nn.Module):
    """Masked MLP with tanh hidden units: output (B, D, params_per_feature) whose ``[:, i]`` depends
    only on the inputs strictly before ``i`` in ``order`` (``"natural"``: 0, 1, ...; ``"reversed"``).

    Input ``i`` gets degree ``d_i`` in 1..D (its position in the order); hidden units get degrees
    1..D-1 in turn, so each degree is present whenever ``hidden_features >= D - 1``. A unit sees the
    units of lower layers with degree <= its own, and the outputs of feature ``i`` see degrees
    ``< d_i``. The output layer starts at zero, so flows built on it start as the identity. Tanh
    rather than ReLU keeps the network smooth, so Jacobians are defined everywhere.

    References: Germain et al., "MADE: Masked Autoencoder for Distribution Estimation", ICML 2015.
    """

    def __init__(
        self,
        features: int,
        hidden_features: int,
        hidden_layers: int = 2,
        params_per_feature: int = 2,
        order: str = "natural",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_option("order", order, ORDERS)
        if features < 1 or hidden_features < 1 or hidden_layers < 0 or params_per_feature < 1:
            raise ValueError(
                f"need features >= 1, hidden_features >= 1, hidden_layers >= 0, params_per_feature >= 1; got "
                f"features={features}, hidden_features={hidden_features}, hidden_layers={hidden_layers}, "
                f"params_per_feature={params_per_feature}"
            )
        self.features = features
        self.params_per_feature = params_per_feature
        positions = torch.arange(features)
        input_degrees = positions + 1 if order == "natural" else features - positions
        self.register_buffer("input_degrees", input_degrees)
        hidden_degrees = torch.arange(hidden_features) % max(features - 1, 1) + 1
        output_degrees = input_degrees.repeat_interleave(params_per_feature)  # (D * P,), feature-major

        layers: list[nn.Module] = []
        degrees, width = input_degrees, features
        for _ in range(hidden_layers):
            mask = hidden_degrees[:, None] >= degrees[None, :]  # (hidden, in)
            layers += [MaskedLinear(width, hidden_features, mask), nn.Tanh()]
            degrees, width = hidden_degrees, hidden_features
        self.output = MaskedLinear(width, features * params_per_feature, output_degrees[:, None] > degrees[None, :])
        self.hidden = nn.Sequential(*layers)
        if generator is not None:
            with torch.no_grad():
                for layer in layers:
                    if isinstance(layer, MaskedLinear):
                        bound = layer.in_features**-0.5
                        layer.weight.uniform_(-bound, bound, generator=generator)
                        layer.bias.uniform_(-bound, bound, generator=generator)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.output(self.hidden(x))  # (B, D * P)
        return out.view(x.shape[0], self.features, self.params_per_feature)  # (B, D * P) -> (B, D, P)
