"""Memory-saving backpropagation through invertible layers.

Standard autograd keeps every intermediate activation of every flow step for the backward pass.
Here a chain of invertible layers (a Glow level: its flow steps and split) runs without building a
graph and only its output is kept. The backward pass walks the chain from the end: it rebuilds each
layer's input from its output with the exact inverse, recomputes that layer with gradients,
backpropagates through it, and continues with the rebuilt input. Activation memory then holds one
output per level plus one layer's activations, however deep the levels are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from glowlab.flows.base import Flow, chain_forward
from glowlab.flows.precision import network_state, networks_under


class _Chain:
    """Layers run in order (not a Module: the layers stay registered where they already are)."""

    def __init__(self, layers: Sequence[Flow]) -> None:
        self.layers = list(layers)
        self.params = [p for layer in self.layers for p in layer.parameters() if p.requires_grad]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return chain_forward(self.layers, x)


class _InvertibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chain: _Chain, x: Tensor, *params: Tensor) -> tuple[Tensor, Tensor]:
        ctx.chain = chain
        ctx.device_type = x.device.type
        ctx.autocast = torch.is_autocast_enabled(ctx.device_type)
        ctx.autocast_dtype = torch.get_autocast_dtype(ctx.device_type)
        # Inside a model's float32 data path: the networks' autocast, for the inverse and the recomputation.
        ctx.networks = network_state()
        with torch.no_grad():
            y, logdet = chain.forward(x)
        ctx.save_for_backward(y)
        ctx.input_dtype = x.dtype
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_logdet: Tensor) -> tuple:
        (y,) = ctx.saved_tensors
        chain: _Chain = ctx.chain
        work = torch.promote_types(y.dtype, torch.float32)
        y = y.detach()
        param_grads: dict[int, Tensor] = {}
        # Layer by layer from the output: rebuild the layer's input with its inverse, recompute the
        # layer with gradients, backpropagate through it alone, and move on. Only one layer's
        # activations exist at any time.
        for layer in reversed(chain.layers):
            with torch.no_grad(), torch.autocast(ctx.device_type, enabled=False), networks_under(ctx.networks):
                # Reconstruct in at least float32: a low-precision inverse would drift from the input.
                x = layer.inverse(y.to(work)).to(ctx.input_dtype)
            x.requires_grad_(True)
            params = [p for p in layer.parameters() if p.requires_grad]
            autocast = torch.autocast(ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast)
            with torch.enable_grad(), autocast, networks_under(ctx.networks):
                y2, logdet = layer(x)
            outputs, grads = [y2], [grad_y]
            if grad_logdet is not None and logdet.requires_grad:
                outputs.append(logdet)
                grads.append(grad_logdet.to(logdet.dtype))
            found = torch.autograd.grad(outputs, [x, *params], grads, allow_unused=True)
            grad_y = found[0]
            for p, g in zip(params, found[1:], strict=True):
                if g is not None:
                    param_grads[id(p)] = g if id(p) not in param_grads else param_grads[id(p)] + g
            y = x.detach()
        return (None, grad_y, *(param_grads.get(id(p)) for p in chain.params))


def invertible_forward(layers: Sequence[Flow], x: Tensor) -> tuple[Tensor, Tensor]:
    """``layers`` applied to ``x`` as one chain whose activations are recomputed in backward.

    Without gradients (inference, ``torch.no_grad``) the chain simply runs. Layers must be exact
    bijections with an ``inverse``; ActNorm's data-dependent initialisation happens on the first
    (graph-free) forward as usual.

    References: Gomez et al., "The Reversible Residual Network: Backpropagation Without Storing
    Activations", NeurIPS 2017.
    """
    chain = _Chain(layers)
    for layer in chain.layers:
        if type(layer).inverse is Flow.inverse:
            raise TypeError(f"memory='invertible' needs invertible layers; {type(layer).__name__} has no inverse")
    if not torch.is_grad_enabled() or not (x.requires_grad or chain.params):
        return chain.forward(x)
    return _InvertibleFunction.apply(chain, x, *chain.params)


__all__ = ["invertible_forward"]
