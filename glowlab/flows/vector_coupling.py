"""Coupling layers for vectors: alternate dimensions condition an elementwise transform of the rest."""

from __future__ import annotations

import torch
from torch import Tensor

from glowlab.flows.base import Flow, check_option, sum_except_batch
from glowlab.flows.elementwise import TRANSFORMERS, apply_transformer, check_spline_options, transformer_params
from glowlab.flows.nn import mlp


class VectorCoupling(Flow):
    """``y_b = tau(x_b; NN(x_a))``, ``y_a = x_a`` on (B, D), with ``a``/``b`` alternating dimensions.

    ``parity=0``: the even dimensions condition and the odd ones are transformed; ``parity=1`` the
    opposite, so stacking both parities transforms every dimension. ``transformer`` is
    ``"affine"`` (``x * exp(s) + m``, ``s`` soft-clamped to (-3, 3)), ``"additive"`` (``x + m``,
    volume preserving) or ``"spline"`` (rational-quadratic on ``[-bound, bound]``, identity tails).

    References: Dinh et al., "NICE: Non-linear Independent Components Estimation", 2014;
    Dinh et al., "Density estimation using Real NVP", ICLR 2017; Durkan et al., "Neural Spline Flows",
    NeurIPS 2019.
    """

    def __init__(
        self,
        features: int,
        hidden_features: int = 64,
        hidden_layers: int = 2,
        transformer: str = "affine",
        parity: int = 0,
        bins: int = 8,
        bound: float = 3.0,
    ) -> None:
        super().__init__()
        check_option("transformer", transformer, TRANSFORMERS)
        if features < 2:
            raise ValueError(f"features={features}: a coupling layer needs at least 2 features")
        if parity not in (0, 1):
            raise ValueError(f"parity={parity!r} is not one of 0, 1")
        if transformer == "spline":
            check_spline_options(bins, bound)
        self.transformer = transformer
        self.bound = bound
        index = torch.arange(features)
        self.register_buffer("conditioning", index[index % 2 == parity])
        self.register_buffer("transformed", index[index % 2 != parity])
        self.params_per_feature = transformer_params(transformer, bins)
        num_transformed = len(self.transformed)
        self.net = mlp(
            len(self.conditioning), hidden_features, hidden_layers, num_transformed * self.params_per_feature
        )

    def _couple(self, v: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        params = self.net(v[:, self.conditioning])  # (B, D_b * P)
        params = params.view(v.shape[0], len(self.transformed), self.params_per_feature)  # (B, D_b, P)
        out, log_derivative = apply_transformer(
            self.transformer, v[:, self.transformed], params, inverse=inverse, bound=self.bound
        )
        return v.index_copy(1, self.transformed, out), sum_except_batch(log_derivative)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(x, inverse=False)

    def inverse(self, y: Tensor) -> Tensor:
        return self._couple(y, inverse=True)[0]

    def inverse_with_logdet(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._couple(y, inverse=True)
