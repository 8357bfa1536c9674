"""Multiscale image flows: Glow, RealNVP and NICE on one skeleton of levels.

A :class:`MultiscaleFlow` is a stack of :class:`Level` flows (a squeeze, flow steps, a split that
factors out half of the channels) and a top prior; :class:`MultiscaleConfig` is everything that
defines one, including the data it models (image shape, grey levels), and travels with every
checkpoint and exported model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

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
from glowlab.flows.base import Flow, chain_inverse, check_option, choose, run_forward, run_inverse
from glowlab.flows.conv1x1 import InvConv1x1, LUFactorised, mixing_matrices
from glowlab.flows.coupling import CheckerboardCoupling
from glowlab.flows.dequantization import VariationalDequantizer
from glowlab.flows.elementwise import ElementwiseAffine
from glowlab.flows.invertible import invertible_forward
from glowlab.flows.nn import NetKernels, network_kernels
from glowlab.flows.precision import float32_data_path, network_state
from glowlab.flows.priors import CONDITIONINGS
from glowlab.flows.squeeze import MEMORY_FORMATS, to_memory_format
from glowlab.likelihood import dequantize

# The named options as types, so that `glowlab fit --help` lists their values and the parser refuses
# others. The registries (ARCHITECTURES, COUPLINGS, PERMUTATIONS, MEMORY_FORMATS) build the layers and
# stay the source of truth: tests/test_help.py checks that each type names exactly their entries.
Architecture = Literal["glow", "realnvp", "nice", "transformer"]
Coupling = Literal["affine", "additive", "checkerboard"]
Permutation = Literal["lu", "conv", "reverse", "shuffle"]
Backprop = Literal["standard", "invertible"]
MemoryFormat = Literal["contiguous", "channels_last"]
Conditioning = Literal["top", "top-position", "priors", "couplings"]
Dequantization = Literal["uniform", "variational"]
DEQUANTIZATIONS: tuple[str, ...] = get_args(Dequantization)
BACKPROPS: tuple[str, ...] = get_args(Backprop)
# Options renamed since earlier versions: the old name -> the new one.
RENAMED = {"step": "architecture", "memory": "backprop"}


@dataclass(frozen=True)
class MultiscaleConfig:
    """Everything that defines a multiscale image flow, and the data contract it was trained on.

    ``image_shape`` (C, H, W) and ``n_bins`` (grey levels per channel) describe the data: ``glowlab
    fit`` takes them from the prepared data set, and every job checks data against them.
    ``architecture`` is the classic model the levels are built as: ``"glow"`` (ActNorm,
    ``permutation``, ``coupling`` per step), ``"realnvp"`` (per level ``steps`` checkerboard affine
    couplings, the squeeze, then ``steps`` channel affine couplings alternated by a reversal; ActNorm
    stands in for the paper's batch norm) or ``"nice"`` (``steps`` additive couplings alternated by
    a reversal and a learned diagonal scaling of the top latent; ``levels=1`` and
    ``learn_top=False`` give the paper's single-scale model). ``steps`` is the number of flow steps
    per level. ``backprop="invertible"`` recomputes activations from the outputs in the backward
    pass instead of storing them (:mod:`glowlab.flows.invertible`). ``memory_format`` is how
    activations are stored (``"channels_last"`` or ``"contiguous"``); it changes no value.
    ``conditioning`` is where a class-conditional model's label acts: ``"top"`` (Glow's: the top
    prior's mean and scale move by an offset per channel), ``"top-position"`` (per channel and
    position: a diagonal Gaussian per class over the whole top latent), ``"priors"`` (that, and
    every level's factored-out latent too) or ``"couplings"`` (every prior and every coupling
    network, whose first hidden layer gets a learned offset per class).

    ``dequantization`` is the noise that makes the integer images continuous: ``"uniform"``
    (``u ~ U[0, 1)`` per dimension) or ``"variational"`` (Flow++'s learned q(u | x): a flow of
    ``dequantization_steps`` conditional couplings, ``dequantization_channels`` wide, trained with
    the model on the variational bound; :mod:`glowlab.flows.dequantization`).

    ``architecture="transformer"`` is the transformer autoregressive flow (TarFlow) instead of
    levels: the image cut into ``patch_size`` x ``patch_size`` patches, ``steps`` flow blocks, each a
    causal transformer of ``layers_per_block`` layers, ``hidden_channels`` wide with ``heads``
    attention heads, the patch order reversed between blocks. ``noise_std`` is its training-time
    Gaussian noise augmentation (samples are then denoised by one score step) and, for
    class-conditional models, ``label_dropout`` the fraction of training labels dropped so that
    sampling can use classifier-free guidance. ``levels``, ``coupling``, ``permutation``,
    ``learn_top`` and ``conditioning`` are the level architectures' options and do not apply to it.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018;
    Ho et al., "Flow++", ICML 2019; Zhai et al., "Normalizing Flows are Capable Generative Models", 2024.
    """

    image_shape: tuple[int, int, int] = (3, 32, 32)
    n_bins: int = 256
    architecture: Architecture = "glow"
    levels: int = 3
    steps: int = 32
    hidden_channels: int = 512
    coupling: Coupling = "affine"
    permutation: Permutation = "lu"
    learn_top: bool = True
    num_classes: int | None = None
    conditioning: Conditioning = "top"
    backprop: Backprop = "standard"
    memory_format: MemoryFormat = "channels_last"
    dequantization: Dequantization = "uniform"
    dequantization_steps: int = 4
    dequantization_channels: int = 32
    patch_size: int = 2
    layers_per_block: int = 2
    heads: int = 4
    noise_std: float = 0.0
    label_dropout: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", tuple(int(v) for v in self.image_shape))
        check_option("architecture", self.architecture, (*ARCHITECTURES, "transformer"))
        check_option("dequantization", self.dequantization, DEQUANTIZATIONS)
        check_option("coupling", self.coupling, tuple(COUPLINGS))
        check_option("permutation", self.permutation, tuple(PERMUTATIONS))
        check_option("backprop", self.backprop, BACKPROPS)
        check_option("memory_format", self.memory_format, MEMORY_FORMATS)
        check_option("conditioning", self.conditioning, CONDITIONINGS)
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape={self.image_shape} is not a (C, H, W) shape")
        _, h, w = self.image_shape
        if self.levels < 1 or self.steps < 1 or self.hidden_channels < 1:
            raise ValueError(
                f"levels, steps and hidden_channels must be >= 1, got levels={self.levels}, "
                f"steps={self.steps}, hidden_channels={self.hidden_channels}"
            )
        if self.architecture == "transformer":
            self._check_transformer()
        elif h % 2**self.levels or w % 2**self.levels:
            raise ValueError(
                f"image_shape={self.image_shape}: height and width must be divisible by 2**levels={2**self.levels}"
            )
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 or None, got {self.num_classes}")
        if self.conditioning in ("priors", "couplings") and self.backprop == "invertible" and self.num_classes:
            # Invertible backprop recomputes a level as one chain of layers that take no label.
            raise ValueError(f"conditioning={self.conditioning!r} (labels inside the levels) needs backprop='standard'")
        if self.n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {self.n_bins}")
        if self.dequantization_steps < 1 or self.dequantization_channels < 1:
            raise ValueError(
                f"dequantization_steps={self.dequantization_steps} and dequantization_channels="
                f"{self.dequantization_channels} must be >= 1"
            )

    def _check_transformer(self) -> None:
        _, h, w = self.image_shape
        p = self.patch_size
        if p < 1 or h % p or w % p:
            raise ValueError(
                f"patch_size={p}: it must divide the image height and width of image_shape={self.image_shape}"
            )
        if self.hidden_channels % self.heads:
            raise ValueError(f"hidden_channels={self.hidden_channels} must be divisible by heads={self.heads}")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block={self.layers_per_block} must be >= 1")
        if self.backprop != "standard":
            raise ValueError("architecture='transformer' trains with backprop='standard' only")
        if not (self.noise_std >= 0 and self.noise_std < float("inf")):
            raise ValueError(f"noise_std={self.noise_std} must be a finite number >= 0")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout={self.label_dropout} must be in [0, 1)")

    @property
    def coupling_classes(self) -> int | None:
        """The number of classes the coupling networks are conditioned on (None: they take no label)."""
        return self.num_classes if self.conditioning == "couplings" else None

    @classmethod
    def check_names(cls, options: dict[str, Any], where: str = "") -> None:
        """Raise ``TypeError`` naming a renamed or unknown option (``where`` prefixes the names)."""
        for old, new in RENAMED.items():
            if old in options:
                raise TypeError(f"{where}{old} is now called {where}{new}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise TypeError(f"{where}{unknown[0]} is not an option of the model (its options: {', '.join(fields)})")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON-ready): the config as stored in exported models."""
        return {**dataclasses.asdict(self), "image_shape": list(self.image_shape)}


# Checkpoints hold the config: let torch.load(weights_only=True) (Lightning's resume) read it.
torch.serialization.add_safe_globals([MultiscaleConfig])


class MultiscaleOutput(NamedTuple):
    """Everything one encoding pass yields; ``class_logits`` is None for unconditional models.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    zs: list[Tensor]
    logdet: Tensor
    log_prob: Tensor
    class_logits: Tensor | None


class ImageFlow(nn.Module):
    """What every glowlab image model offers besides its flow: the data contract and the dequantization.

    Subclasses (:class:`MultiscaleFlow`, :class:`~glowlab.models.transformer.TransformerFlow`) set
    ``config`` and ``dequantizer`` and implement ``evaluate``, ``decode`` and ``sample_latents``.
    """

    config: MultiscaleConfig
    dequantizer: VariationalDequantizer | None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model is for."""
        return self.config.image_shape

    @property
    def n_bins(self) -> int:
        """Grey levels per channel of the data the model is for (bits/dim depend on it)."""
        return self.config.n_bins

    @property
    def num_classes(self) -> int | None:
        return self.config.num_classes

    @property
    def predicts_class(self) -> bool:
        """Whether ``evaluate`` gives class logits (the multiscale flows' auxiliary classifier)."""
        return getattr(self, "class_head", None) is not None

    @property
    def num_dims(self) -> int:
        """D, the number of dimensions of one image."""
        c, h, w = self.image_shape
        return c * h * w

    @staticmethod
    def _resolve_config(
        config: MultiscaleConfig | None, options: dict[str, Any], default: MultiscaleConfig
    ) -> MultiscaleConfig:
        """``config`` (or ``default``) with ``options`` replaced; a wrong type or an unknown option stops here."""
        if config is not None and not isinstance(config, MultiscaleConfig):
            raise TypeError(f"config={config!r}: pass a MultiscaleConfig, or the options as keywords (image_shape=...)")
        MultiscaleConfig.check_names(options)
        return dataclasses.replace(config or default, **options)

    def _make_dequantizer(self) -> None:
        config = self.config
        self.dequantizer = (
            VariationalDequantizer(
                config.image_shape, config.n_bins, config.dequantization_steps, config.dequantization_channels
            )
            if config.dequantization == "variational"
            else None
        )

    def evaluate(self, x: Tensor, y: Tensor | None = None) -> MultiscaleOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Log-density of ``x`` in nats, shape (B,): prior terms plus log-determinant."""
        return self.evaluate(x, y).log_prob

    def dequantize(self, levels: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log q(u | k))``: integer images ``levels`` made continuous with base uniform ``noise``.

        Uniform dequantization uses ``noise`` as ``u`` (``log q = 0``); variational dequantization
        turns it into ``u ~ q(u | k)`` (:class:`~glowlab.flows.dequantization.VariationalDequantizer`).
        ``x = (k + u) / n_bins - 0.5`` as in :func:`glowlab.likelihood.dequantize`.
        """
        if self.dequantizer is None:
            x = dequantize(levels, self.n_bins, noise=noise)
            return x, x.new_zeros(x.shape[0])
        u, log_q = self.dequantizer(noise, levels)
        return dequantize(levels, self.n_bins, noise=u), log_q

    def redequantize(self, x: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`dequantize` for images the data pipeline dequantized uniformly: its noise is read back from ``x``.

        The pipeline's ``x = (k + u₀) / n_bins - 0.5`` is recomputed with the noise the model
        learned, so training keeps the pipeline's seeded draws. ``levels`` (the integer images)
        say which bin each value belongs to, so rounding at a bin edge cannot change the image.
        """
        if self.dequantizer is None:
            return x, x.new_zeros(x.shape[0])
        noise = ((x.double() + 0.5) * self.n_bins - levels.double()).clamp(0.0, 1.0).to(x.dtype)
        return self.dequantize(levels, noise)

    def decode(self, zs: list[Tensor], y: Tensor | None = None) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode_samples(self, zs: list[Tensor], y: Tensor | None = None, guidance: float = 0.0) -> Tensor:
        """Images from latents drawn from the base density: :meth:`decode`, and what the model does to its samples.

        ``guidance`` (classifier-free guidance) is for models trained for it; the multiscale flows take none.
        """
        if guidance:
            raise ValueError(
                f"guidance={guidance:g}: classifier-free guidance needs a class-conditional transformer flow, "
                f"not a {self.config.architecture} model"
            )
        return self.decode(zs, y)

    def log_bound(self, levels: Tensor, noise: Tensor, y: Tensor | None = None) -> Tensor:
        """``log p(x) - log q(u | k)`` per image (nats, shape (B,)): what bits/dim are made of.

        With :func:`glowlab.likelihood.bits_per_dim` it gives the variational bound of the integer
        images ``levels`` for one draw of base uniform ``noise``; for uniform dequantization it is
        ``log_prob`` of the uniformly dequantized images.
        """
        x, log_q = self.dequantize(levels, noise)
        return self.log_prob(x, y) - log_q


def _total(values: list[Tensor]) -> Tensor:
    """Sum of a non-empty list of (B,) tensors, without a leading ``0 +`` (one operator each)."""
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


class FlowStep(FlowSequence):
    """One step of flow: ActNorm, a channel permutation, a coupling layer.

    With a learned 1x1 convolution (``permutation`` ``"lu"`` or ``"conv"``) and ActNorm initialised,
    the two run as one convolution: ``W((x + b) * e^s) = (W diag(e^s)) x + W diag(e^s) b``, so the
    per-channel affine costs a few operations on (C, C) matrices instead of two passes over the
    activations (and their backward passes). Values and gradients are those of the separate layers
    up to float rounding; the parameters and ``state_dict`` are unchanged. ``index`` is the step's
    position in its level (the checkerboard coupling alternates its parity with it).

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(
        self,
        num_channels: int,
        hidden_channels: int,
        coupling: str,
        permutation: str,
        index: int = 0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(
            [
                ActNorm(num_channels),
                make_permutation(permutation, num_channels),
                make_coupling(coupling, num_channels, hidden_channels, index, num_classes),
            ]
        )
        # The folded step (:func:`folded_step`): MultiscaleFlow.compile_steps puts one compiled version shared by all
        # steps here.
        self.couple_fn = folded_step

    @property
    def learned_mixing(self) -> bool:
        """Whether the channel mixing is a learned 1x1 convolution (foldable with ActNorm)."""
        return isinstance(self.layers[1], InvConv1x1 | LUFactorised)

    def foldable(self) -> bool:
        """Whether ActNorm and the 1x1 convolution can run as one convolution now (ActNorm initialised)."""
        return self.learned_mixing and self.layers[0].is_initialized

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not self.foldable():
            return super().forward(x, context)  # ActNorm's data-dependent initialisation needs it on its own
        weight, logabsdet = self.layers[1].matrix()
        # (C, C) -> (1, C, C): folded as a batch of one step.
        (kernel,), (bias,), logdet_per_pixel = fold_actnorm(weight[None], [self.layers[0]], logabsdet)
        y, logdet = self.couple_fn(self, x, kernel, bias, context)
        return y, logdet + logdet_per_pixel * (x.shape[2] * x.shape[3])


def folded_step(
    step: FlowStep,
    x: Tensor,
    kernel: Tensor,
    bias: Tensor,
    context: Tensor | None = None,
    net_kernels: NetKernels | None = None,
) -> tuple[Tensor, Tensor]:
    """``step`` with its ActNorm and 1x1 convolution folded into ``kernel`` and ``bias``.

    A free function, so that one ``torch.compile`` of it serves every step: the compiled graph
    takes the step's parameters as inputs and is reused for every step of the same shape.
    Returns the output and the coupling's log-determinant only: the folded layers' part is the
    same at every pixel and is added by the caller (see :func:`fold_actnorm`). ``context`` goes to
    a class-conditional coupling; ``net_kernels`` are the coupling network's layers' weights and
    biases (see :func:`glowlab.flows.nn.network_kernels`), or None for the network to compute them.
    """
    # Every coupling takes a context (one without classes ignores it), as the flow contract allows.
    return step.layers[2](F.conv2d(x, kernel, bias), context, kernels=net_kernels)


# dynamo's default recompile limit, which it applies per code object: what one compiled function gets.
RECOMPILES_PER_LAYER = 8


def share_recompile_limit(layers: int) -> None:
    """Raise dynamo's per-function recompile limit so that ``layers`` compiled layers sharing one code
    object may each recompile as often as a function compiled on its own.

    Regionally compiled layers share their code (one :func:`folded_step`, one ``forward`` per class),
    and dynamo counts the graphs of a code object against one limit. A model's variants (each level's
    shape, grad mode, eval mode, a ragged last batch, a capture's autocast state) would otherwise use
    up the default 8 in training and leave the rest of the run eager. dynamo's global cap on all
    graphs (``accumulated_recompile_limit``) still stops runaway recompilation. The limit is only
    ever raised.
    """
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILES_PER_LAYER * layers)


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


class Level(FlowSequence):
    """One scale of a multiscale flow: its layers (a squeeze and flow steps) and, but at the top, a split.

    ``forward`` returns the split's output, which has the shape the steps produce: the first
    ``split.keep`` channels flow on to the next level and the rest is this level's standardised
    latent; :meth:`chunk` separates them. Once ActNorm is initialised, the Glow steps of a level
    with learned 1x1 convolutions assemble all their convolution weights at once: the K LU products
    and ActNorm folds (see :meth:`FlowStep.forward`) and the K output convolutions of the coupling
    networks (:func:`glowlab.flows.nn.network_kernels`; under autocast every network convolution's
    weights, cast once) run as batched operations over the level instead of K times over small
    tensors, so a training step dispatches far fewer operators.
    Values are those of the layers run one by one.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, layers: list[Flow], split: Split | None) -> None:
        super().__init__(layers)
        self.split = split

    def chain(self) -> list[Flow]:
        """The level's layers in order, split included (what invertible backprop runs as one chain)."""
        return [*self.layers, *([self.split] if self.split is not None else [])]

    def chunk(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(kept, latent)`` halves of a forward output; the whole output and None at the top."""
        return (y, None) if self.split is None else self.split.chunk(y)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        steps = [layer for layer in self.layers if isinstance(layer, FlowStep) and layer.learned_mixing]
        if len(steps) < 2 or not all(step.foldable() for step in steps):
            x, logdet = super().forward(x, context)
        else:
            x, logdet = self._folded(x, steps, context)
        if self.split is not None:
            x, ld = run_forward(self.split, x, context)
            logdet = logdet + ld
        return x, logdet

    def _folded(self, x: Tensor, steps: list[FlowStep], context: Tensor | None) -> tuple[Tensor, Tensor]:
        folded = None
        logdet = None
        for layer in self.layers:
            if isinstance(layer, FlowStep) and layer.learned_mixing:
                if folded is None:  # the steps' resolution is known from here on
                    weights, logabsdet = mixing_matrices([step.layers[1] for step in steps])
                    kernels, biases, per_pixel = fold_actnorm(weights, [step.layers[0] for step in steps], logabsdet)
                    state = network_state()
                    nets = network_kernels([step.layers[2].net for step in steps], None if state is None else state[1])
                    folded = zip(kernels, biases, nets, strict=True)
                    pixels = x.shape[2] * x.shape[3]
                kernel, bias, net_kernels = next(folded)
                x, ld = layer.couple_fn(layer, x, kernel, bias, context, net_kernels)
            else:
                x, ld = run_forward(layer, x, context)
            logdet = ld if logdet is None else logdet + ld
        return x, logdet + per_pixel * pixels

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        if self.split is not None:
            y = run_inverse(self.split, y, context)
        return chain_inverse(self.layers, y, context)

    def inverse_with_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = None
        if self.split is not None:
            split = self.split
            y, logdet = split.inverse_with_logdet(y, context) if split.conditional else split.inverse_with_logdet(y)
        y, ld = super().inverse_with_logdet(y, context)
        return y, ld if logdet is None else logdet + ld


def glow_layers(c: int, config: MultiscaleConfig) -> list[Flow]:
    """Glow: the squeeze, then ``steps`` steps of ActNorm, ``permutation`` and ``coupling``."""
    classes = config.coupling_classes
    return [Squeeze(config.memory_format)] + [
        FlowStep(4 * c, config.hidden_channels, config.coupling, config.permutation, k, classes)
        for k in range(config.steps)
    ]


def realnvp_layers(c: int, config: MultiscaleConfig) -> list[Flow]:
    """RealNVP: checkerboard couplings at full resolution, the squeeze, channel couplings alternated by a reversal.

    References: Dinh et al., "Density estimation using Real NVP", ICLR 2017.
    """
    hidden, classes = config.hidden_channels, config.coupling_classes
    before = [FlowSequence([ActNorm(c), CheckerboardCoupling(c, hidden, k % 2, classes)]) for k in range(config.steps)]
    after = [FlowStep(4 * c, hidden, "affine", "reverse", k, classes) for k in range(config.steps)]
    return [*before, Squeeze(config.memory_format), *after]


def nice_layers(c: int, config: MultiscaleConfig) -> list[Flow]:
    """NICE: the squeeze, then additive couplings alternated by a reversal (volume preserving).

    References: Dinh et al., "NICE: Non-linear Independent Components Estimation", 2014.
    """
    steps = [
        FlowSequence([Reverse(4 * c), AdditiveCoupling(4 * c, config.hidden_channels, config.coupling_classes)])
        for _ in range(config.steps)
    ]
    return [Squeeze(config.memory_format), *steps]


# The classic multiscale flows by name: each builds one level's layers for ``c`` input channels.
ARCHITECTURES: dict[str, Callable[[int, MultiscaleConfig], list[Flow]]] = {
    "glow": glow_layers,
    "realnvp": realnvp_layers,
    "nice": nice_layers,
}


class MultiscaleFlow(ImageFlow):
    """A multiscale image flow (Glow, RealNVP or NICE): ``levels`` x :class:`Level`, a learned top prior.

    Built from a :class:`MultiscaleConfig` (or the same options as keywords: ``MultiscaleFlow(levels=2,
    steps=8, ...)``), available as ``config``; the model knows its data contract (``image_shape``,
    ``n_bins``). ``encode`` maps dequantized images in [-0.5, 0.5) to standardised latents ``zs``,
    one per level (finest first, the top level last). Each level's learned prior is part of the
    bijection (see :mod:`glowlab.flows.priors`), so the base density of ``zs`` is N(0, I) and
    ``log_prob(x) = log N(zs; 0, I) + logdet``, in nats of the continuous density on [-0.5, 0.5)^D.
    With ``num_classes`` the top prior is class-conditional (the label is its context) and a linear
    head on the top latent predicts the class (the paper's auxiliary loss); pass ``y`` to every
    method then. ``backprop="invertible"`` trains without storing activations inside a level:
    results and gradients are those of ``"standard"``.

    ``Glow`` is another name for this class.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    Dinh et al., "Density estimation using Real NVP", ICLR 2017; Dinh et al., "NICE", 2014.
    """

    def __init__(self, config: MultiscaleConfig | None = None, **options: Any) -> None:
        super().__init__()
        config = self._resolve_config(config, options, MultiscaleConfig())
        if config.architecture == "transformer":
            raise ValueError(
                "architecture='transformer' is a TransformerFlow: build it with glowlab.models.image_flow(config)"
            )
        self.config = config
        c, h, w = config.image_shape
        build = choose("architecture", config.architecture, ARCHITECTURES)
        self.levels = nn.ModuleList()
        z_shapes: list[tuple[int, int, int]] = []
        for level in range(config.levels):
            layers = build(c, config)
            c, h, w = 4 * c, h // 2, w // 2  # after the squeeze
            if config.architecture == "nice" and level == config.levels - 1:
                # NICE's couplings keep the volume; this diagonal scaling is what learns it.
                layers.append(ElementwiseAffine((c, h, w)))
            conditional_split = config.num_classes if config.conditioning in ("priors", "couplings") else None
            split = Split(c, conditional_split, (h, w)) if level < config.levels - 1 else None
            self.levels.append(Level(layers, split))
            if split is not None:
                z_shapes.append((c - split.keep, h, w))
                c = split.keep
        z_shapes.append((c, h, w))
        self._z_shapes = tuple(z_shapes)
        self.top_prior = TopPrior(
            (c, h, w),
            learn_top=config.learn_top,
            num_classes=config.num_classes,
            per_position=config.conditioning != "top",
        )
        self.class_head = nn.Linear(c, config.num_classes) if config.num_classes else None
        if self.class_head is not None:
            # Zero initialisation: uniform class predictions at the start, as in the reference code.
            nn.init.zeros_(self.class_head.weight)
            nn.init.zeros_(self.class_head.bias)
        self._make_dequantizer()
        self._register_load_state_dict_pre_hook(_rename_split_keys)

    @property
    def z_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """Shapes (C, H, W) of the latents ``encode`` returns, finest level first."""
        return self._z_shapes

    @property
    def initialized(self) -> bool:
        """Whether every ActNorm has had its data-dependent initialisation (a host-side check)."""
        return all(m.is_initialized for m in self.modules() if isinstance(m, ActNorm))

    def compile_steps(self) -> None:
        """Compile the flow steps with ``torch.compile``, one graph per step shape, shared by the steps.

        Every step of a level has the same shapes and code, so the compiled graph of one (with the
        parameters as graph inputs) serves them all: a model compiles a handful of small graphs,
        one per level and kind of layer, whatever its depth. The splits and the top prior (a few
        operators each) stay eager. ``state_dict`` keys are unchanged. Raises dynamo's recompile
        limit to what the steps would have if compiled one by one (:func:`share_recompile_limit`).
        Call it once ActNorm is initialised (see :attr:`initialized`): the initialisation runs
        once, outside any graph.

        References: PyTorch, "Reducing torch.compile cold start compilation time with regional
        compilation", 2024.
        """
        if not self.initialized:
            raise RuntimeError("compile_steps needs initialised ActNorm layers: run one training batch first")
        shared = torch.compile(folded_step, dynamic=False)
        compiled = 0
        for level in self.levels:
            for layer in level.layers:
                compiled += not isinstance(layer, Squeeze)
                if isinstance(layer, FlowStep) and layer.learned_mixing:
                    # The (C, C) fold stays eager and the compiled graph takes the folded kernel as
                    # an input, on every path that runs the step (a level's batched fold, a level of
                    # one step, invertible backprop): inductor in torch 2.11 fails to lower a
                    # convolution whose weight is computed inside the graph.
                    layer.couple_fn = shared
                elif not isinstance(layer, Squeeze):
                    # The squeeze is a reshape and a copy, nothing to fuse; the rest are flow steps
                    # without a learned 1x1 convolution (RealNVP, NICE), compiled whole.
                    layer.compile(dynamic=False)
        share_recompile_limit(compiled)

    @float32_data_path
    def evaluate(self, x: Tensor, y: Tensor | None = None) -> MultiscaleOutput:
        """One pass giving latents, log-determinant, ``log_prob`` and (if conditional) class logits.

        Under autocast only the coupling networks run in its precision; the rest stays in the
        parameters' (see :mod:`glowlab.flows.precision`).
        """
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}"
            )
        zs: list[Tensor] = []
        logdets: list[Tensor] = []
        h = to_memory_format(x, self.config.memory_format)
        for level in self.levels:
            if self.config.backprop == "invertible":
                h, ld = invertible_forward(level.chain(), h)
            else:
                h, ld = level(h, y)
            logdets.append(ld)
            h, z = level.chunk(h)
            if z is not None:
                zs.append(z)
        class_logits = self.class_head(h.mean(dim=(2, 3))) if self.class_head is not None else None
        z, ld = self.top_prior(h, y)
        zs.append(z)
        logdets.append(ld)
        logdet = _total(logdets)
        log_prob = logdet + _total([standard_normal_log_prob(z) for z in zs])
        return MultiscaleOutput(zs, logdet, log_prob, class_logits)

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """``(zs, logdet)``: standardised latents per level and ``log|det dzs/dx|`` of shape (B,)."""
        out = self.evaluate(x, y)
        return out.zs, out.logdet

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """Same as :meth:`encode`: the model is itself a flow in the data -> latent direction."""
        return self.encode(x, y)

    @float32_data_path
    def decode(self, zs: list[Tensor], y: Tensor | None = None) -> Tensor:
        """Exact inverse of :meth:`encode` (also under the same autocast, to float32 rounding; see
        :mod:`glowlab.flows.precision` for the rare exception)."""
        if len(zs) != len(self.z_shapes):
            raise ValueError(f"expected {len(self.z_shapes)} latents (one per level), got {len(zs)}")
        h = self.top_prior.inverse(zs[-1], y)
        for i in reversed(range(len(self.levels))):
            level = self.levels[i]
            if level.split is not None:
                h = torch.cat([h, zs[i]], dim=1)
            h = level.inverse(h, y)
        return h

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
        return self.decode_samples(self.sample_latents(n, temperature, generator), y)


def _rename_split_keys(state_dict: dict, prefix: str, *args: Any) -> None:
    """Load checkpoints written before the split moved into its level: ``splits.i.`` -> ``levels.i.split.``."""
    old = prefix + "splits."
    for key in [k for k in state_dict if k.startswith(old)]:
        index, rest = key[len(old) :].split(".", 1)
        state_dict[f"{prefix}levels.{index}.split.{rest}"] = state_dict.pop(key)


Glow = MultiscaleFlow


def image_flow(config: MultiscaleConfig) -> ImageFlow:
    """The image model ``config`` describes: a :class:`MultiscaleFlow`, or for ``architecture="transformer"`` a
    :class:`~glowlab.models.transformer.TransformerFlow`."""
    if config.architecture == "transformer":
        from glowlab.models.transformer import TransformerFlow  # it builds on this module's classes

        return TransformerFlow(config)
    return MultiscaleFlow(config)
