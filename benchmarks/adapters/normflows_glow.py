"""normflows' multiscale Glow for ``benchmarks/glow_step.py``, built as in normflows' Glow example.

An adapter is a Python file with ``build(config) -> nn.Module`` and ``loss(model, x) -> Tensor``
(a scalar to minimise, for images ``x`` in [-0.5, 0.5)); ``optimizer(model, lr)`` and
``sample(model, n)`` are optional. ``config`` holds ``image_shape``, ``levels``, ``steps`` and
``hidden_channels``. Write one like this for any other Glow and pass its path to ``--impl``.

References: Stimper et al., "normflows: A PyTorch Package for Normalizing Flows", JOSS 2023.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def build(config: dict) -> nn.Module:
    """normflows' ``MultiscaleFlow`` of ``GlowBlock``s (affine coupling, LU 1x1 convolutions)."""
    import normflows as nf

    channels, height, width = config["image_shape"]
    levels, steps, hidden = config["levels"], config["steps"], config["hidden_channels"]
    q0, merges, flows = [], [], []
    for i in range(levels):
        level = [
            nf.flows.GlowBlock(channels * 2 ** (levels + 1 - i), hidden, split_mode="channel", scale=True)
            for _ in range(steps)
        ]
        flows.append([*level, nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            scale = 2 ** (levels - i)
            latent = (channels * scale, height // scale, width // scale)
        else:
            latent = (channels * 2 ** (levels + 1), height // 2**levels, width // 2**levels)
        q0.append(nf.distributions.GlowBase(latent))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def loss(model: nn.Module, x: Tensor) -> Tensor:
    """normflows' maximum-likelihood loss, on data shifted to [0, 1) as its examples feed it."""
    return model.forward_kld(x + 0.5)


def optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """torch's Adam with its default implementation choice, as normflows' examples train."""
    return torch.optim.Adam(model.parameters(), lr=lr)


def sample(model: nn.Module, n: int) -> Tensor:
    return model.sample(n)[0]
