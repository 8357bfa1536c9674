"""Multiscale Glow."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glowlab.flows import (
    COUPLINGS,
    PERMUTATIONS,
    ActNorm,
    AdditiveCoupling,
    FlowSequence,
    Reverse,
    Split,
    Squeeze,
    TopPrior,
    make_coupling,
    make_permutation,
    standard_normal_log_prob,
)
from glowlab.flows.base import check_option
from glowlab.flows.conv1x1 import InvConv1x1, LUFactorised, mixing_matrices
from glowlab.flows.coupling import CheckerboardCoupling
from glowlab.flows.elementwise import ElementwiseAffine
from glowlab.flows.invertible import invertible_forward
from glowlab.flows.squeeze import MEMORY_FORMATS, to_memory_format

MEMORY_MODES = ("standard", "invertible")
# How each level's flow steps are built (see Glow's docstring): the three classic multiscale flows.
STEPS = ("glow", "realnvp", "nice")


def _total(values: list[Tensor]) -> Tensor:
    """Sum of a non-empty list of (B,) tensors, without a leading ``0 +`` (one operator each)."""
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


class GlowOutput(NamedTuple):
    """Everything one encoding pass yields; ``class_logits`` is None for unconditional models.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    zs: list[Tensor]
    logdet: Tensor
    log_prob: Tensor
    class_logits: Tensor | None


class FlowStep(FlowSequence):
    """One step of flow: ActNorm, a channel permutation, a coupling layer.

    With a learned 1x1 convolution (``permutation`` ``"lu"`` or ``"conv"``) and ActNorm initialised,
    the two run as one convolution: ``W((x + b) * e^s) = (W diag(e^s)) x + W diag(e^s) b``, so the
    per-channel affine costs a few operations on (C, C) matrices instead of two passes over the
    activations (and their backward passes). Values and gradients are those of the separate layers
    up to float rounding; the parameters and ``state_dict`` are unchanged.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, num_channels: int, hidden_channels: int, coupling: str, permutation: str) -> None:
        super().__init__(
            [
                ActNorm(num_channels),
                make_permutation(permutation, num_channels),
                make_coupling(coupling, num_channels, hidden_channels),
            ]
        )
        # What :meth:`couple` runs; Glow.compile_steps puts one compiled version shared by all steps here.
        self.couple_fn = folded_step

    @property
    def learned_mixing(self) -> bool:
        """Whether the channel mixing is a learned 1x1 convolution (foldable with ActNorm)."""
        return isinstance(self.layers[1], InvConv1x1 | LUFactorised)

    def foldable(self) -> bool:
        """Whether ActNorm and the 1x1 convolution can run as one convolution now (ActNorm initialised)."""
        return self.learned_mixing and self.layers[0].is_initialized

    def couple(self, x: Tensor, kernel: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """The step with its ActNorm and 1x1 convolution given as one folded ``kernel`` and ``bias``.

        Returns the output and the coupling's log-determinant only: the folded layers' part is the
        same at every pixel and is added by the caller (see :func:`fold_actnorm`).
        """
        return self.couple_fn(self, x, kernel, bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.foldable():
            return super().forward(x)  # ActNorm's data-dependent initialisation needs it on its own
        weight, logabsdet = self.layers[1].matrix()
        # (C, C) -> (1, C, C): folded as a batch of one step.
        (kernel,), (bias,), logdet_per_pixel = fold_actnorm(weight[None], [self.layers[0]], logabsdet)
        y, logdet = self.couple(x, kernel, bias)
        return y, logdet + logdet_per_pixel * (x.shape[2] * x.shape[3])


def folded_step(step: FlowStep, x: Tensor, kernel: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """``step`` with its ActNorm and 1x1 convolution folded into ``kernel`` and ``bias``.

    A free function, so that one ``torch.compile`` of it serves every step: the compiled graph
    takes the step's parameters as inputs and is reused for every step of the same shape.
    """
    return step.layers[2](F.conv2d(x, kernel, bias))


def fold_actnorm(
    weights: Tensor, actnorms: list[ActNorm], logabsdet: Tensor
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], Tensor]:
    """Fold K ActNorms into the K 1x1 convolutions that follow them: ``W((x + b) e^s) = W' x + b'``.

    ``weights`` is (K, C, C), ``logabsdet`` the sum of their log-determinants. Returns the K folded
    (C, C, 1, 1) kernels ``W' = W diag(e^s)``, the K biases ``b' = W' b``, and the log-determinant of
    all 2K layers per pixel (a scalar: multiply by H x W).
    """
    k, c = weights.shape[0], weights.shape[1]
    logs = torch.stack([a.logs for a in actnorms]).view(k, 1, c)  # K x (1, C, 1, 1) -> (K, 1, C)
    shift = torch.stack([a.bias for a in actnorms]).view(k, c, 1)  # K x (1, C, 1, 1) -> (K, C, 1)
    weights = weights * logs.exp()  # scales column j of each W by e^(s_j)
    biases = weights @ shift  # (K, C, C) @ (K, C, 1) -> (K, C, 1)
    kernels = weights.view(k, c, c, 1, 1).unbind(0)  # K x (C, C, 1, 1)
    return kernels, biases.view(k, c).unbind(0), logs.sum() + logabsdet


class GlowLevel(FlowSequence):
    """The layers of one level (its squeeze and flow steps), run in order.

    Once ActNorm is initialised, the Glow steps of a level with learned 1x1 convolutions assemble all
    their convolution weights at once: the K LU products and ActNorm folds (see
    :meth:`FlowStep.forward`) run as batched operations over the level instead of K times over small
    matrices. The training step then dispatches far fewer operators, which on a GPU is most of the
    time of a step at small batch sizes. Values are those of the layers run one by one.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        steps = [layer for layer in self.layers if isinstance(layer, FlowStep) and layer.learned_mixing]
        if len(steps) < 2 or not all(step.foldable() for step in steps):
            return super().forward(x)
        folded = None
        logdet = None
        for layer in self.layers:
            if isinstance(layer, FlowStep) and layer.learned_mixing:
                if folded is None:  # the steps' resolution is known from here on
                    weights, logabsdet = mixing_matrices([step.layers[1] for step in steps])
                    kernels, biases, per_pixel = fold_actnorm(weights, [step.layers[0] for step in steps], logabsdet)
                    folded = zip(kernels, biases, strict=True)
                    pixels = x.shape[2] * x.shape[3]
                x, ld = layer.couple(x, *next(folded))
            else:
                x, ld = layer(x)
            logdet = ld if logdet is None else logdet + ld
        return x, logdet + per_pixel * pixels


def realnvp_checkerboard_step(num_channels: int, hidden_channels: int, parity: int) -> FlowSequence:
    """ActNorm then a checkerboard affine coupling (RealNVP's pre-squeeze layers).

    References: Dinh et al., "Density estimation using Real NVP", ICLR 2017.
    """
    return FlowSequence([ActNorm(num_channels), CheckerboardCoupling(num_channels, hidden_channels, parity)])


def nice_step(num_channels: int, hidden_channels: int) -> FlowSequence:
    """Swap the halves, then an additive coupling: volume preserving.

    References: Dinh et al., "NICE: Non-linear Independent Components Estimation", 2014.
    """
    return FlowSequence([Reverse(num_channels), AdditiveCoupling(num_channels, hidden_channels)])


def level_layers(
    step: str, c: int, hidden: int, steps: int, coupling: str, permutation: str, memory_format: str
) -> list:
    """One level's layers for input channels ``c``: its squeeze and ``steps`` flow steps of kind ``step``."""
    squeeze = Squeeze(memory_format)
    if step == "glow":
        return [squeeze] + [FlowStep(4 * c, hidden, coupling, permutation) for _ in range(steps)]
    if step == "realnvp":
        # Checkerboard couplings at full resolution, then channel couplings (alternated by a
        # reversal) after the squeeze, as in the paper's scale blocks.
        before = [realnvp_checkerboard_step(c, hidden, k % 2) for k in range(steps)]
        after = [FlowStep(4 * c, hidden, "affine", "reverse") for _ in range(steps)]
        return [*before, squeeze, *after]
    return [squeeze] + [nice_step(4 * c, hidden) for _ in range(steps)]


class Glow(nn.Module):
    """Multiscale Glow: ``levels`` times (squeeze, ``steps`` flow steps, split), learned priors.

    ``encode`` maps dequantized images in [-0.5, 0.5) to standardised latents ``zs``, one per level
    (finest first, the top level last). Each level's learned prior is part of the bijection (see
    :mod:`glowlab.flows.priors`), so the base density of ``zs`` is N(0, I) and
    ``log_prob(x) = log N(zs; 0, I) + logdet``, in nats of the continuous density on [-0.5, 0.5)^D.
    With ``num_classes`` the top prior is class-conditional and a linear head on the top latent
    predicts the class (the paper's auxiliary loss); pass ``y`` to every method then.
    ``memory="invertible"`` trains without storing activations inside a level: the backward pass
    rebuilds each level's input from its output with the exact inverse (see
    :mod:`glowlab.flows.invertible`); results and gradients are those of ``"standard"``.
    ``memory_format`` is how activations are stored between layers: ``"channels_last"`` (the
    default: oneDNN and cuDNN convolutions run faster on it; see ``benchmarks/README.md``) or
    ``"contiguous"`` (NCHW). It changes no parameter and no value beyond float rounding.

    ``step`` picks the classic model this multiscale skeleton builds: ``"glow"`` (ActNorm,
    ``permutation``, ``coupling``), ``"realnvp"`` (per level ``steps`` checkerboard affine
    couplings, the squeeze, then ``steps`` channel affine couplings alternated by a reversal; ActNorm
    stands in for the paper's batch norm) or ``"nice"`` (``steps`` additive couplings alternated by a
    reversal, volume preserving, and a learned diagonal scaling of the top latent; use ``levels=1``
    and ``learn_top=False`` for the paper's single-scale model with a fixed prior).

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    Dinh et al., "Density estimation using Real NVP", ICLR 2017; Dinh et al., "NICE", 2014.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        levels: int = 3,
        steps: int = 32,
        hidden_channels: int = 512,
        coupling: str = "affine",
        permutation: str = "lu",
        learn_top: bool = True,
        num_classes: int | None = None,
        memory: str = "standard",
        step: str = "glow",
        memory_format: str = "channels_last",
    ) -> None:
        super().__init__()
        check_option("memory_format", memory_format, MEMORY_FORMATS)
        check_option("step", step, STEPS)
        check_option("memory", memory, MEMORY_MODES)
        check_option("coupling", coupling, COUPLINGS)
        check_option("permutation", permutation, PERMUTATIONS)
        self.memory_format = memory_format
        self.step = step
        self.memory = memory
        c, h, w = (int(v) for v in image_shape)
        if levels < 1 or steps < 1:
            raise ValueError(f"levels and steps must be >= 1, got levels={levels}, steps={steps}")
        if h % 2**levels or w % 2**levels:
            raise ValueError(
                f"image_shape={tuple(image_shape)}: height and width must be divisible by 2**levels={2**levels}"
            )
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 or None, got {num_classes}")
        self.image_shape = (c, h, w)
        self.num_classes = num_classes

        self.levels = nn.ModuleList()
        self.splits = nn.ModuleList()
        z_shapes: list[tuple[int, int, int]] = []
        for level in range(levels):
            layers = level_layers(step, c, hidden_channels, steps, coupling, permutation, memory_format)
            c, h, w = 4 * c, h // 2, w // 2  # after the squeeze
            if step == "nice" and level == levels - 1:
                # NICE's couplings keep the volume; this diagonal scaling is what learns it.
                layers.append(ElementwiseAffine((c, h, w)))
            self.levels.append(GlowLevel(layers))
            if level < levels - 1:
                split = Split(c)
                self.splits.append(split)
                z_shapes.append((c - split.keep, h, w))
                c = split.keep
        z_shapes.append((c, h, w))
        self._z_shapes = tuple(z_shapes)
        self.top_prior = TopPrior((c, h, w), learn_top=learn_top, num_classes=num_classes)
        self.class_head = nn.Linear(c, num_classes) if num_classes else None
        if self.class_head is not None:
            # Zero initialisation: uniform class predictions at the start, as in the reference code.
            nn.init.zeros_(self.class_head.weight)
            nn.init.zeros_(self.class_head.bias)

    @property
    def z_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """Shapes (C, H, W) of the latents ``encode`` returns, finest level first."""
        return self._z_shapes

    @property
    def num_dims(self) -> int:
        """D, the number of dimensions of one image."""
        c, h, w = self.image_shape
        return c * h * w

    @property
    def initialized(self) -> bool:
        """Whether every ActNorm has had its data-dependent initialisation (a host-side check)."""
        return all(m.is_initialized for m in self.modules() if isinstance(m, ActNorm))

    def compile_steps(self) -> None:
        """Compile the flow steps with ``torch.compile``, one graph per step shape, shared by the steps.

        Every step of a level has the same shapes and code, so the compiled graph of one (with the
        parameters as graph inputs) serves them all: a model compiles a handful of small graphs,
        one per level and kind of layer, whatever its depth. The splits and the top prior (a few
        operators each) stay eager. ``state_dict`` keys are unchanged.
        Call it once ActNorm is initialised (see :attr:`initialized`): the initialisation runs
        once, outside any graph.

        References: PyTorch, "Reducing torch.compile cold start compilation time with regional
        compilation", 2024.
        """
        if not self.initialized:
            raise RuntimeError("compile_steps needs initialised ActNorm layers: run one training batch first")
        shared = torch.compile(folded_step, dynamic=False)
        for level in self.levels:
            for layer in level.layers:
                if isinstance(layer, FlowStep):
                    layer.couple_fn = shared
                # The squeeze is a reshape and a copy, nothing to fuse; the rest are flow steps, run
                # through forward when they are not folded (RealNVP, NICE, invertible backprop).
                if not isinstance(layer, Squeeze):
                    layer.compile(dynamic=False)

    def evaluate(self, x: Tensor, y: Tensor | None = None) -> GlowOutput:
        """One pass giving latents, log-determinant, ``log_prob`` and (if conditional) class logits."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}"
            )
        zs: list[Tensor] = []
        h = to_memory_format(x, self.memory_format)
        logdets: list[Tensor] = []
        for i, level in enumerate(self.levels):
            split = self.splits[i] if i < len(self.splits) else None
            if self.memory == "invertible":
                h, ld = invertible_forward([*level.layers, *([split] if split is not None else [])], h)
                logdets.append(ld)
            else:
                h, ld = level(h)
                logdets.append(ld)
                if split is not None:
                    h, ld = split(h)
                    logdets.append(ld)
            if split is not None:
                h, z = split.chunk(h)
                zs.append(z)
        class_logits = self.class_head(h.mean(dim=(2, 3))) if self.class_head is not None else None
        z, ld = self.top_prior(h, y)
        zs.append(z)
        logdets.append(ld)
        logdet = _total(logdets)
        log_prob = logdet + _total([standard_normal_log_prob(z) for z in zs])
        return GlowOutput(zs, logdet, log_prob, class_logits)

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """``(zs, logdet)``: standardised latents per level and ``log|det dzs/dx|`` of shape (B,)."""
        out = self.evaluate(x, y)
        return out.zs, out.logdet

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """Same as :meth:`encode`: the model is itself a flow in the data -> latent direction."""
        return self.encode(x, y)

    def decode(self, zs: list[Tensor], y: Tensor | None = None) -> Tensor:
        """Exact inverse of :meth:`encode`."""
        if len(zs) != len(self.z_shapes):
            raise ValueError(f"expected {len(self.z_shapes)} latents (one per level), got {len(zs)}")
        h = self.top_prior.inverse(zs[-1], y)
        for i in reversed(range(len(self.levels))):
            if i < len(self.splits):
                h = self.splits[i].inverse(torch.cat([h, zs[i]], dim=1))
            h = self.levels[i].inverse(h)
        return h

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Log-density of ``x`` in nats, shape (B,): prior terms plus log-determinant."""
        return self.evaluate(x, y).log_prob

    def sample_latents(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> list[Tensor]:
        """Standardised latents drawn from N(0, temperature^2 I), one tensor per level."""
        p = next(self.parameters())
        return [
            temperature * torch.randn((n, *shape), generator=generator, device=p.device, dtype=p.dtype)
            for shape in self.z_shapes
        ]

    @torch.no_grad()
    def sample(
        self, n: int, temperature: float = 1.0, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``n`` images in about [-0.5, 0.5); ``temperature`` scales the prior std at every level."""
        return self.decode(self.sample_latents(n, temperature, generator), y)
