"""The transformer autoregressive image flow (TarFlow), with the interface of the multiscale flows."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from glowlab.flows import standard_normal_log_prob
from glowlab.flows.transformer import AutoregressiveBlock, patchify, unpatchify
from glowlab.models.multiscale import ImageFlow, MultiscaleConfig, MultiscaleOutput, share_recompile_limit


class TransformerFlow(ImageFlow):
    """TarFlow: the image cut into patches, ``steps`` causal-transformer autoregressive flow blocks.

    Built from a :class:`MultiscaleConfig` with ``architecture="transformer"`` (or its options as
    keywords), and a drop-in for :class:`~glowlab.models.multiscale.MultiscaleFlow`: the same
    ``evaluate`` / ``encode`` / ``decode`` / ``log_prob`` / ``sample`` methods, with one latent, the
    image-shaped ``z``, of base density N(0, I). Block ``k`` runs over the patches in raster order
    when ``k`` is even and in reversed order when odd. With ``num_classes`` every block is
    class-conditional: labels are ``0 .. num_classes - 1``, and ``num_classes`` itself is the null
    label (:meth:`drop_labels` puts it in during training) that classifier-free guidance
    (``guidance`` of :meth:`decode` and :meth:`sample`) contrasts with. With ``noise_std > 0`` the
    model is of images plus that Gaussian noise, and :meth:`sample` removes it with one score step.

    References: Zhai et al., "Normalizing Flows are Capable Generative Models", 2024; Gu et al.,
    "STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis", 2025.
    """

    def __init__(self, config: MultiscaleConfig | None = None, **options: Any) -> None:
        super().__init__()
        config = self._resolve_config(config, options, MultiscaleConfig(architecture="transformer"))
        if config.architecture != "transformer":
            raise ValueError(f"TransformerFlow needs architecture='transformer', got {config.architecture!r}")
        self.config = config
        c, h, w = config.image_shape
        p = config.patch_size
        self.blocks = nn.ModuleList(
            AutoregressiveBlock(
                c * p * p,
                (h // p) * (w // p),
                config.hidden_channels,
                config.heads,
                config.layers_per_block,
                config.num_classes,
                reverse=k % 2 == 1,
            )
            for k in range(config.steps)
        )
        self._make_dequantizer()

    @property
    def z_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """Shapes (C, H, W) of the latents ``encode`` returns: one, the shape of the image."""
        return (self.image_shape,)

    @property
    def initialized(self) -> bool:
        """Always True: no layer has a data-dependent initialisation."""
        return True

    def compile_steps(self) -> None:
        """Compile each flow block's forward with ``torch.compile`` (regional compilation).

        The blocks share their code, so the graphs compiled for one serve the others (one per patch
        order). Sampling calls the transformers directly and stays eager. ``state_dict`` keys are unchanged.
        Raises dynamo's recompile limit to what the blocks would have if compiled one by one.

        References: PyTorch, "Reducing torch.compile cold start compilation time with regional
        compilation", 2024.
        """
        for block in self.blocks:
            block.compile(dynamic=False)
        share_recompile_limit(len(self.blocks))

    def _check_images(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}"
            )

    def _check_labels(self, y: Tensor | None) -> None:
        if self.num_classes is not None and y is None:
            raise ValueError(
                f"the model is class-conditional (num_classes={self.num_classes}): pass labels y "
                f"(0..{self.num_classes - 1}, or {self.num_classes} for no label)"
            )

    def evaluate(self, x: Tensor, y: Tensor | None = None) -> MultiscaleOutput:
        """One pass giving the latent, log-determinant and ``log_prob`` (``class_logits`` is None)."""
        self._check_images(x)
        self._check_labels(y)
        seq = patchify(x, self.config.patch_size)
        logdet = None
        for block in self.blocks:
            seq, ld = block(seq, y)
            logdet = ld if logdet is None else logdet + ld
        z = unpatchify(seq, self.config.patch_size, self.image_shape)
        return MultiscaleOutput([z], logdet, standard_normal_log_prob(z) + logdet, None)

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """``([z], logdet)``: the image-shaped latent and ``log|det dz/dx|`` of shape (B,)."""
        out = self.evaluate(x, y)
        return out.zs, out.logdet

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """Same as :meth:`encode`: the model is itself a flow in the data -> latent direction."""
        return self.encode(x, y)

    def decode(self, zs: list[Tensor], y: Tensor | None = None, guidance: float = 0.0, cache: bool = True) -> Tensor:
        """Inverse of :meth:`encode` (exact for ``guidance=0``), one patch at a time per block.

        ``guidance`` w != 0 uses classifier-free guidance with the labels ``y``; ``cache=False``
        recomputes the transformers' full causal passes instead of using key/value caches.
        """
        if len(zs) != 1:
            raise ValueError(f"expected 1 latent (the image-shaped z), got {len(zs)}")
        self._check_images(zs[0])
        self._check_labels(y)
        if guidance != 0 and self.num_classes is None:
            raise ValueError("guidance needs a class-conditional model (num_classes)")
        seq = patchify(zs[0], self.config.patch_size)
        for block in reversed(self.blocks):
            seq = block.inverse(seq, y, cache=cache, guidance=guidance)
        return unpatchify(seq, self.config.patch_size, self.image_shape)

    def sample_latents(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> list[Tensor]:
        """The latent drawn from N(0, temperature^2 I), as a one-element list."""
        p = next(self.parameters())
        return [temperature * torch.randn((n, *self.image_shape), generator=generator, device=p.device, dtype=p.dtype)]

    @torch.no_grad()
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        guidance: float = 0.0,
        cache: bool = True,
        denoise: bool = True,
    ) -> Tensor:
        """``n`` images in about [-0.5, 0.5); denoised by one score step when ``noise_std > 0`` and ``denoise``."""
        x = self.decode(self.sample_latents(n, temperature, generator), y, guidance, cache)
        if denoise and self.config.noise_std > 0:
            x = self.denoise(x, y)
        return x

    def decode_samples(self, zs: list[Tensor], y: Tensor | None = None, guidance: float = 0.0) -> Tensor:
        """Images from prior latents, as every sampling job makes them: cached decoding with ``guidance``,
        then the one-step denoising when the model was trained with noise (``noise_std > 0``)."""
        x = self.decode(zs, y, guidance)
        return self.denoise(x, y) if self.config.noise_std > 0 else x

    def denoise(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``x + noise_std**2 * grad_x log p(x | y)``: Tweedie's one-step denoising of noisy images.

        References: Zhai et al., "Normalizing Flows are Capable Generative Models", 2024; Efron,
        "Tweedie's Formula and Selection Bias", 2011.
        """
        # Gradients on a detached copy, with respect to it only (the parameters' .grad stay untouched):
        # this runs inside sample's no_grad, or a caller's inference_mode, whose tensors need a clone.
        with torch.inference_mode(False), torch.enable_grad():
            noisy = x.detach().clone().requires_grad_(True)
            (score,) = torch.autograd.grad(self.log_prob(noisy, y).sum(), noisy)
        return x.detach() + self.config.noise_std**2 * score

    def drop_labels(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``y`` with each label replaced by the null label ``num_classes`` with probability ``label_dropout``."""
        if self.num_classes is None:
            raise ValueError("drop_labels needs a class-conditional model (num_classes)")
        device = generator.device if generator is not None else y.device
        drop = torch.rand(y.shape, generator=generator, device=device).to(y.device) < self.config.label_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)
