"""The networks inside flow layers (not flows themselves), in one place.

Glow's zero-initialised convolution and coupling networks for images; MLPs for vectors (the
conditioners of coupling layers, i-RevNet's residual function); masked linear layers (MADE) and
spectrally normalised ones (i-ResNet).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glowlab.flows.base import check_option
from glowlab.flows.precision import network_precision

ACTIVATIONS = {"tanh": nn.Tanh, "elu": nn.ELU}
# The (weight, bias) a convolution runs with, when its caller computed them.
ConvKernel = tuple[Tensor, Tensor]
# Per layer of a network, the (weight, bias) its caller computed, or None for a layer that runs itself.
NetKernels = tuple[ConvKernel | None, ...]


class ZeroConv2d(nn.Module):
    """3x3 convolution initialised to output zeros, with a learned per-channel output scale.

    Output = ``conv(x) * exp(3 · logs)``; the factor 3 lets the scale move faster than the weights
    early in training. Zero initialisation makes the layer it feeds start as the identity (a
    coupling) or as a standard normal (a prior).

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    logscale_factor = 3.0

    def __init__(self, in_channels: int, out_channels: int, offset: Tensor | None = None, halves: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        # With ``halves`` the output channels come out as [even..., odd...] rather than interleaved
        # as the parameters are (the reference implementation's layout, kept for checkpoints): the
        # two outputs of a coupling or prior net are then its channel halves, whose gradients
        # assemble into the convolution's memory format. Interleaved halves would be gathered back
        # by a stack, in NCHW, and a channels-last convolution's backward would pay to convert.
        self.halves = halves
        order = torch.cat([torch.arange(0, out_channels, 2), torch.arange(1, out_channels, 2)]) if halves else None
        self.register_buffer("order", order, persistent=False)
        # A fixed per-channel constant added to the output (neither learned nor saved), in output
        # order: a layer that shifts this output before a nonlinearity (the coupling's ``+ 2`` before
        # its sigmoid) folds the shift into the bias here instead of a pass over the activations.
        self.register_buffer("offset", torch.zeros(out_channels) if offset is None else offset, persistent=False)

    def kernel(self) -> tuple[Tensor, Tensor]:
        """The weight and bias the convolution runs with: scale folded in, outputs in order, offset added."""
        logs = self.logs.view(-1)  # (1, out, 1, 1) -> (out,)
        return scaled_kernel(self.weight, self.bias, logs, self.order, self.offset)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, *self.kernel(), padding=1)


def scaled_kernel(
    weight: Tensor, bias: Tensor, logs: Tensor, order: Tensor | None, offset: Tensor
) -> tuple[Tensor, Tensor]:
    """:class:`ZeroConv2d`'s kernel and bias from its parameters, for one layer or for K stacked.

    ``weight`` is (..., out, in, 3, 3), ``bias``, ``logs`` and ``offset`` are (..., out). The output
    scale is folded into the (small) kernel and bias, so backprop keeps no extra copy of the
    (large) output; ``order`` (or None) reorders the output channels.
    """
    scale = (logs * ZeroConv2d.logscale_factor).exp()
    weight = weight * scale.view(*scale.shape, 1, 1, 1)  # (..., out) -> (..., out, 1, 1, 1): scales each filter
    bias = bias * scale
    if order is not None:
        weight, bias = weight.index_select(-4, order), bias.index_select(-1, order)
    return weight, bias + offset


def network_kernels(nets: Sequence[nn.Sequential], dtype: torch.dtype | None = None) -> list[NetKernels]:
    """The (weight, bias) the layers of K networks of one shape run with, computed for all K at once.

    A level's K coupling networks end in a :class:`ZeroConv2d`, whose kernel is computed from three
    parameters at every step; computing the K kernels as one batched operation per parameter,
    instead of K times a few operators on small tensors, takes that many operators out of a
    training step. With ``dtype`` (the networks' autocast dtype, see :mod:`glowlab.flows.precision`)
    every convolution's weight and bias is also cast once for the level, where autocast would cast
    them at every step. Values are each layer's own. Layers left to run themselves (activations,
    layers whose shapes differ across the networks) get None.
    """
    first = nets[0]
    if any(len(net) != len(first) for net in nets):
        return [(None,) * len(net) for net in nets]
    per_layer: list[list[ConvKernel | None]] = []
    for i, layer in enumerate(first):
        layers = [net[i] for net in nets]
        stacked = None
        if _same_shape(layers) and isinstance(layer, ZeroConv2d) and all(c.halves == layer.halves for c in layers):
            stacked = scaled_kernel(
                torch.stack([c.weight for c in layers]),  # K x (out, in, 3, 3) -> (K, out, in, 3, 3)
                torch.stack([c.bias for c in layers]),  # K x (out,) -> (K, out)
                torch.stack([c.logs for c in layers]).view(len(layers), -1),  # K x (1, out, 1, 1) -> (K, out)
                layer.order,
                torch.stack([c.offset for c in layers]),  # K x (out,) -> (K, out)
            )
        elif dtype is not None and _same_shape(layers) and type(layer) is nn.Conv2d and layer.bias is not None:
            # K x (out, in, k, k) -> (K, out, in, k, k) and K x (out,) -> (K, out)
            stacked = torch.stack([c.weight for c in layers]), torch.stack([c.bias for c in layers])
        if stacked is not None and dtype is not None and stacked[0].dtype != torch.float64:  # autocast's rule
            stacked = stacked[0].to(dtype), stacked[1].to(dtype)
        per_layer.append(
            [None] * len(nets) if stacked is None else list(zip(*(t.unbind(0) for t in stacked), strict=True))
        )
    return list(zip(*per_layer, strict=True))


def _same_shape(layers: Sequence[nn.Module]) -> bool:
    first = layers[0]
    return all(
        type(c) is type(first) and isinstance(c, nn.Conv2d | ZeroConv2d) and c.weight.shape == first.weight.shape
        for c in layers
    )


def run_with(layer: nn.Module, h: Tensor, kernel: ConvKernel | None) -> Tensor:
    """``layer(h)``, with the convolution ``layer`` run with ``kernel`` when the caller computed it."""
    if kernel is None:
        return layer(h)
    if isinstance(layer, ZeroConv2d):
        return F.conv2d(h, *kernel, padding=1)
    return F.conv2d(h, *kernel, layer.stride, layer.padding, layer.dilation, layer.groups)


def interleaved_halves(h: Tensor) -> tuple[Tensor, Tensor]:
    """Even and odd channels of ``h`` (B, 2C, H, W) as two (B, C, H, W) views, in one operator.

    Glow's learned top prior interleaves its two outputs (mean and log-scale) over the channels,
    as the reference implementation does.
    """
    return h.unflatten(1, (-1, 2)).unbind(2)  # (B, 2C, H, W) -> (B, C, 2, H, W) -> 2 x (B, C, H, W)


def coupling_net(
    in_channels: int, hidden_channels: int, out_channels: int, offset: Tensor | None = None, halves: bool = False
) -> nn.Sequential:
    """Glow's coupling network: 3x3 conv, ReLU, 1x1 conv, ReLU, zero-initialised 3x3 conv.

    The zero-initialised output makes every coupling start as the identity, which is what lets
    deep Glow models train from the first step. ``offset`` and ``halves`` go to the last layer
    (see :class:`ZeroConv2d`).
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden_channels, hidden_channels, 1),
        nn.ReLU(),
        ZeroConv2d(hidden_channels, out_channels, offset, halves),
    )


def class_offset(
    embedding: nn.Linear, labels: Tensor | None, num_classes: int, shape: tuple[int, ...], dtype: torch.dtype
) -> Tensor:
    """``embedding(one-hot labels)`` as a (B, K, H, W) ``shape``: a class-dependent offset of a prior or a net."""
    if labels is None:
        raise ValueError("this model is class-conditional (num_classes is set): pass labels y as the context")
    # One-hot by comparison, not F.one_hot: one_hot checks the label range on the host (a device
    # synchronisation), and an embedding lookup's CUDA backward synchronises too.
    classes = torch.arange(num_classes, device=labels.device)
    onehot = (labels[:, None] == classes).to(dtype)  # (B, num_classes)
    return embedding(onehot).view(shape)  # (B, K*H*W) -> (B, K, H, W)


def class_embedding(num_classes: int | None, features: int) -> nn.Linear | None:
    """A zero-initialised linear map of one-hot labels (None without classes): conditioning starts as a no-op."""
    if not num_classes:
        return None
    layer = nn.Linear(num_classes, features)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def conditioned_net(
    net: nn.Sequential,
    x: Tensor,
    embedding: nn.Linear | None,
    labels: Tensor | None,
    kernels: NetKernels | None = None,
) -> Tensor:
    """``net(x)``, with ``embedding``'s class offset added to the first layer's output when there is one.

    The network runs in the caller's autocast precision (:func:`~glowlab.flows.precision.network_precision`)
    and its output comes back in ``x``'s dtype.

    ``kernels``, when given, are the (weight, bias) its layers run with, computed by the caller (a
    level computes all its steps' at once, see :func:`network_kernels`); None for a layer that runs itself.
    """
    h = x
    with network_precision():
        for i, layer in enumerate(net):
            h = layer(h) if kernels is None else run_with(layer, h, kernels[i])
            if i == 0 and embedding is not None:
                h = h + class_offset(embedding, labels, embedding.in_features, (h.shape[0], -1, 1, 1), h.dtype)
    # Back to the data path's precision (a no-op without autocast): see glowlab.flows.precision.
    return h.to(x.dtype)


def affine_net(in_channels: int, hidden_channels: int, transformed: int) -> nn.Sequential:
    """A coupling network whose output is ``[shift | pre-scale]`` for ``transformed`` channels.

    The parameters keep the reference implementation's interleaved layout (even = shift, odd =
    scale); the output comes in halves with the ``+ 2`` of ``sigmoid(h + 2)`` already added.
    """
    offset = torch.cat([torch.zeros(transformed), torch.full((transformed,), 2.0)])
    return coupling_net(in_channels, hidden_channels, 2 * transformed, offset, halves=True)


def layer_widths(in_features: int, hidden_features: int, hidden_layers: int, out_features: int) -> list[int]:
    """The widths of an MLP's layers, input to output; at least one hidden layer."""
    if hidden_layers < 1:
        raise ValueError(f"hidden_layers must be >= 1, got {hidden_layers}")
    return [in_features] + [hidden_features] * hidden_layers + [out_features]


def init_uniform(tensor: Tensor, bound: float, generator: torch.Generator | None) -> None:
    """Fill ``tensor`` with U(-bound, bound) drawn from ``generator`` (the global one when None)."""
    with torch.no_grad():
        tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) * (2 * bound) - bound)


def mlp(
    in_features: int,
    hidden_features: int,
    hidden_layers: int,
    out_features: int,
    activation: str = "tanh",
    zero_output: bool = True,
    uniform_init: bool = False,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """Linear layers with ``activation`` between them (``hidden_layers`` hidden layers, 0 allowed).

    ``zero_output`` starts the last layer at zero, so the layer it drives starts as the identity.
    ``uniform_init`` draws every weight and bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
    ``generator``, so a seeded layer is reproducible on its own.
    """
    check_option("activation", activation, tuple(ACTIVATIONS))
    widths = [in_features] + [hidden_features] * hidden_layers + [out_features]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        linear = nn.Linear(a, b)
        if uniform_init:
            init_uniform(linear.weight, 1.0 / math.sqrt(a), generator)
            init_uniform(linear.bias, 1.0 / math.sqrt(a), generator)
        layers += [linear, ACTIVATIONS[activation]()]
    layers.pop()  # no activation after the output layer
    if zero_output:
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


class MaskedLinear(nn.Linear):
    """``y = x (W ⊙ mask)^T + b``: a linear layer with a fixed 0/1 connectivity mask of shape (out, in).

    References: Germain et al., "MADE: Masked Autoencoder for Distribution Estimation", ICML 2015.
    """

    def __init__(self, in_features: int, out_features: int, mask: Tensor) -> None:
        super().__init__(in_features, out_features)
        if mask.shape != (out_features, in_features):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(out_features, in_features)}")
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class SpectralNormLinear(nn.Module):
    """A linear layer whose weight is rescaled so its spectral norm is at most ``lipschitz``.

    The weight used is ``W · min(1, lipschitz / sigma_hat)`` with ``sigma_hat = u^T W v`` from power
    iteration. The singular-vector estimates ``u`` and ``v`` are buffers; in training mode every
    forward call advances them by ``power_iterations`` steps, in eval mode they stay fixed so the
    layer is a fixed function (which an inverse by iteration needs). Power iteration approaches
    ``sigma`` from below, so call :meth:`converge` when the bound must hold tightly.

    References: Miyato et al., "Spectral Normalization for Generative Adversarial Networks", ICLR 2018.
    """

    u: Tensor
    v: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        lipschitz: float = 0.9,
        power_iterations: int = 1,
        *,
        bias: bool = True,
        generator: torch.Generator | None = None,
        init_iterations: int = 20,
    ) -> None:
        super().__init__()
        if not lipschitz > 0:
            raise ValueError(f"lipschitz must be positive, got {lipschitz}")
        if power_iterations < 0:
            raise ValueError(f"power_iterations must be >= 0, got {power_iterations}")
        self.in_features, self.out_features = in_features, out_features
        self.lipschitz, self.power_iterations = float(lipschitz), power_iterations
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        init_uniform(self.weight, bound, generator)
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(out_features))
            init_uniform(self.bias, bound, generator)
        else:
            self.bias = None
        self.register_buffer("u", F.normalize(torch.randn(out_features, generator=generator), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(in_features, generator=generator), dim=0))
        # A random start is a poor estimate; a few steps now mean training starts near the true norm.
        self.converge(init_iterations)

    @torch.no_grad()
    def _power_step(self, iterations: int) -> None:
        w, u, v = self.weight, self.u, self.v
        for _ in range(iterations):
            v = F.normalize(w.T @ u, dim=0, eps=1e-12)
            u = F.normalize(w @ v, dim=0, eps=1e-12)
        self.u.copy_(u)
        self.v.copy_(v)

    def converge(self, iterations: int = 200) -> Tensor:
        """Run ``iterations`` extra power-iteration steps (in any mode); returns the new ``sigma_hat``."""
        self._power_step(iterations)
        return self.spectral_norm_estimate().detach()

    def spectral_norm_estimate(self) -> Tensor:
        """``sigma_hat = u^T W v`` from the current buffers, differentiable with respect to ``W``."""
        # Clones: the buffers change in place on the next training step, after this graph was built.
        return torch.dot(self.u.clone(), self.weight @ self.v.clone())

    def normalized_weight(self, update: bool | None = None) -> Tensor:
        """The rescaled weight; ``update`` (default: training mode) advances power iteration first."""
        if self.training if update is None else update:
            self._power_step(self.power_iterations)
        sigma = self.spectral_norm_estimate()
        scale = torch.clamp(self.lipschitz / sigma.clamp_min(torch.finfo(sigma.dtype).tiny), max=1.0)
        return self.weight * scale

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, lipschitz={self.lipschitz}"
