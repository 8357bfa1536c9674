"""rosinality/glow-pytorch's Glow for ``benchmarks/glow_step.py``, from a local checkout.

That implementation is not on PyPI: clone it and point ``GLOW_PYTORCH_DIR`` at the folder holding
its ``model.py``, then pass this file to ``--impl``. Its model takes ``Glow(in_channel, n_flow,
n_block, affine, conv_lu)`` and returns ``(log_p, logdet, z_outs)``; its coupling width is the
default argument ``filter_size`` of ``AffineCoupling``, which this adapter sets to the config's
``hidden_channels`` before building. glowlab's CI does not have the checkout: the tests run this
adapter against a stand-in module with the same interface.

References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
from torch import Tensor, nn


def _model_module():
    folder = os.environ.get("GLOW_PYTORCH_DIR")
    if not folder or not os.path.isfile(os.path.join(folder, "model.py")):
        raise FileNotFoundError(
            f"GLOW_PYTORCH_DIR={folder!r}: set it to a checkout of rosinality/glow-pytorch (the folder with model.py)"
        )
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("model")


def build(config: dict) -> nn.Module:
    module = _model_module()
    coupling = module.AffineCoupling.__init__
    defaults = list(coupling.__defaults__)
    defaults[0] = config["hidden_channels"]  # filter_size, the first defaulted argument
    coupling.__defaults__ = tuple(defaults)
    return module.Glow(config["image_shape"][0], config["steps"], config["levels"], affine=True, conv_lu=True)


def loss(model: nn.Module, x: Tensor) -> Tensor:
    """Negative log-density per dimension (its ``log_p + logdet``), for dequantized ``x``."""
    log_p, logdet, _ = model(x)
    return -(log_p + logdet).mean() / x[0].numel()


def optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr)
