"""Multiscale Glow."""

from __future__ import annotations

from typing import NamedTuple

import torch
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
from glowlab.flows.coupling import CheckerboardCoupling
from glowlab.flows.elementwise import ElementwiseAffine
from glowlab.flows.invertible import invertible_forward
from glowlab.flows.squeeze import MEMORY_FORMATS, to_memory_format

MEMORY_MODES = ("standard", "invertible")
# How each level's flow steps are built (see Glow's docstring): the three classic multiscale flows.
STEPS = ("glow", "realnvp", "nice")


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
            self.levels.append(FlowSequence(layers))
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

    def evaluate(self, x: Tensor, y: Tensor | None = None) -> GlowOutput:
        """One pass giving latents, log-determinant, ``log_prob`` and (if conditional) class logits."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}"
            )
        logdet = x.new_zeros(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32))
        zs: list[Tensor] = []
        h = to_memory_format(x, self.memory_format)
        for i, level in enumerate(self.levels):
            split = self.splits[i] if i < len(self.splits) else None
            if self.memory == "invertible":
                h, ld = invertible_forward([*level.layers, *([split] if split is not None else [])], h)
                logdet = logdet + ld
            else:
                h, ld = level(h)
                logdet = logdet + ld
                if split is not None:
                    h, ld = split(h)
                    logdet = logdet + ld
            if split is not None:
                h, z = split.chunk(h)
                zs.append(z)
        class_logits = self.class_head(h.mean(dim=(2, 3))) if self.class_head is not None else None
        z, ld = self.top_prior(h, y)
        zs.append(z)
        logdet = logdet + ld
        log_prob = logdet + sum(standard_normal_log_prob(z) for z in zs)
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
