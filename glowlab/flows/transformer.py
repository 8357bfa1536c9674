"""Transformer autoregressive flow blocks over image patches (TarFlow).

An image is cut into a sequence of patches (:func:`patchify`); an :class:`AutoregressiveBlock` is a
masked autoregressive flow over that sequence whose conditioner is a causal transformer
(:class:`CausalTransformer`): the density is one parallel pass, sampling one patch at a time, with a
key/value cache so that each step processes a single new token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glowlab.flows.base import Flow, sum_except_batch

# Keys and values of the tokens seen so far: one list per layer, empty or [keys, values], each
# (B, heads, T, W / heads). A plain list of lists so that the layers can update it in place.
KVCache = list[list[Tensor]]


def patchify(x: Tensor, p: int) -> Tensor:
    """Cut (B, C, H, W) images into (B, N, C*p*p) sequences of p x p patches, in raster order.

    References: Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021.
    """
    b, c, h, w = x.shape
    # (B, C, H, W) -> (B, C, H/p, p, W/p, p)
    x = x.reshape(b, c, h // p, p, w // p, p)
    # -> (B, H/p, W/p, C, p, p): patch rows and columns first, the patch's contents last
    x = x.permute(0, 2, 4, 1, 3, 5)
    # -> (B, N, C*p*p) with N = (H/p) * (W/p)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(seq: Tensor, p: int, image_shape: tuple[int, int, int]) -> Tensor:
    """The exact inverse of :func:`patchify`: (B, N, C*p*p) -> (B, C, H, W) for ``image_shape`` (C, H, W).

    References: Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021.
    """
    c, h, w = image_shape
    b = seq.shape[0]
    # (B, N, C*p*p) -> (B, H/p, W/p, C, p, p)
    x = seq.reshape(b, h // p, w // p, c, p, p)
    # -> (B, C, H/p, p, W/p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)
    # -> (B, C, H, W)
    return x.reshape(b, c, h, w)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which token ``t`` sees tokens ``<= t`` only.

    With a ``cache`` the new tokens are appended to the cached keys and values and attend to all of
    them (incremental decoding); without one, the whole sequence is processed with a causal mask.

    References: Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, cache: list[Tensor] | None = None) -> Tensor:
        b, n, width = x.shape
        # (B, n, 3W) -> (B, n, 3, heads, W/heads) -> (3, B, heads, n, W/heads)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            past = 0
            if cache:
                past = cache[0].shape[2]
                k = torch.cat([cache[0], k], dim=2)
                v = torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
            # New token i (absolute position past + i) sees keys 0..past + i. One new token sees them all,
            # so the common case needs no mask.
            mask = None if n == 1 else torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # (B, heads, n, W/heads) -> (B, n, heads, W/heads) -> (B, n, W)
        return self.proj(out.transpose(1, 2).reshape(b, n, width))


class TransformerLayer(nn.Module):
    """A pre-LayerNorm transformer layer: causal self-attention, then a GELU MLP, each residual.

    References: Xiong et al., "On Layer Normalization in the Transformer Architecture", ICML 2020.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor, cache: list[Tensor] | None = None) -> Tensor:
        x = x + self.attention(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class CausalTransformer(nn.Module):
    """``layers`` x :class:`TransformerLayer` and a final LayerNorm, on (B, T, width) token sequences.

    ``forward(tokens)`` is the full causal pass; ``forward(tokens, cache)`` with a cache from
    :meth:`new_cache` processes only the new tokens, attending to those seen before.

    References: Radford et al., "Language Models are Unsupervised Multitask Learners", 2019.
    """

    def __init__(self, width: int, heads: int, layers: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(width, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def new_cache(self) -> KVCache:
        """An empty key/value cache for incremental decoding."""
        return [[] for _ in self.layers]

    def forward(self, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
        for i, layer in enumerate(self.layers):
            tokens = layer(tokens, None if cache is None else cache[i])
        return self.norm(tokens)


class AutoregressiveBlock(Flow):
    """One TarFlow block: an affine autoregressive flow over a (B, N, d) patch sequence.

    ``z_i = (x_i - mu_i) * exp(-alpha_i)``, where ``(mu_i, alpha_i)`` is the causal transformer's
    output at position ``i``, whose input is a learned start token (plus the class embedding) at
    position 0 and the projected patches ``x_0 .. x_{N-2}`` after it, plus learned positional
    embeddings: patch ``i`` depends on patches ``< i`` only, so ``forward`` (the density) is one
    parallel pass and ``inverse`` (sampling) N sequential ones. ``alpha`` is soft-clamped to
    ``(-bound, bound)``; the zero-initialised output projection makes the block start as the
    identity. ``reverse=True`` runs over the patches in reversed order.

    ``num_classes`` makes the block class-conditional: ``context`` holds labels in
    ``0 .. num_classes``, where ``num_classes`` is the "no label" of classifier-free guidance (also
    what ``context=None`` means). ``inverse(..., guidance=w)`` uses ``(1 + w) * cond - w * uncond``
    for both ``mu`` and ``alpha``.

    References: Zhai et al., "Normalizing Flows are Capable Generative Models", 2024; Papamakarios
    et al., "Masked Autoregressive Flow for Density Estimation", NeurIPS 2017.
    """

    conditional = True

    def __init__(
        self,
        features: int,
        num_patches: int,
        width: int,
        heads: int,
        layers: int,
        num_classes: int | None = None,
        reverse: bool = False,
        bound: float = 3.0,
    ) -> None:
        super().__init__()
        self.features = features
        self.num_patches = num_patches
        self.num_classes = num_classes
        self.reverse = reverse
        self.bound = bound
        self.start = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.position = nn.Parameter(torch.randn(1, num_patches, width) * 0.02)
        self.proj_in = nn.Linear(features, width)
        # Row num_classes is the null label: the same table serves conditional and guidance passes.
        self.class_embedding = nn.Embedding(num_classes + 1, width) if num_classes is not None else None
        self.transformer = CausalTransformer(width, heads, layers)
        self.proj_out = nn.Linear(width, 2 * features)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def _start_token(self, batch: int, context: Tensor | None, like: Tensor) -> Tensor:
        """The (B, 1, W) token at position 0: the start token plus the label's embedding."""
        start = self.start.to(like.dtype).expand(batch, 1, -1)
        if self.class_embedding is None:
            return start
        if context is None:
            context = torch.full((batch,), self.num_classes, dtype=torch.long, device=like.device)
        return start + self.class_embedding(context)[:, None].to(like.dtype)

    def _tokens(self, x: Tensor, context: Tensor | None) -> Tensor:
        """The transformer's (B, N, W) input for patches ``x``: start token, then patches shifted by one."""
        shifted = self.proj_in(x[:, :-1])
        tokens = torch.cat([self._start_token(x.shape[0], context, shifted), shifted], dim=1)
        return tokens + self.position[:, : x.shape[1]]  # a prefix of the sequence when sampling without cache

    def _params(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, alpha)`` from transformer outputs ``h``, alpha soft-clamped to (-bound, bound)."""
        mu, raw = self.proj_out(h).chunk(2, dim=-1)
        # tanh rather than a hard clamp: bounded scales (sampling cannot overflow) with gradients everywhere.
        return mu, self.bound * torch.tanh(raw / self.bound)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.reverse:
            x = x.flip(1)
        mu, alpha = self._params(self.transformer(self._tokens(x, context)))
        z = (x - mu) * torch.exp(-alpha)
        if self.reverse:
            z = z.flip(1)
        return z, -sum_except_batch(alpha)

    def inverse(self, z: Tensor, context: Tensor | None = None, cache: bool = True, guidance: float = 0.0) -> Tensor:
        """``x`` with ``forward(x, context)[0] == z``, patch by patch (guided when ``guidance != 0``).

        ``cache=True`` feeds the transformer one new token per patch, reusing cached keys and values;
        ``cache=False`` re-runs the full causal pass over the prefix at each patch (same result).
        """
        return self._sequential(z, context, cache, guidance)[0]

    def inverse_with_logdet(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # The alphas of the sequential pass are those of forward(x): no second pass is needed.
        return self._sequential(y, context, True, 0.0)

    def _sequential(self, z: Tensor, context: Tensor | None, cache: bool, guidance: float) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dz|)``: the inverse, one patch at a time."""
        if self.reverse:
            z = z.flip(1)
        b, n, _ = z.shape
        guided = guidance != 0 and self.class_embedding is not None and context is not None
        if guided:
            # One pass over a doubled batch: the labels, then the null label for the same patches.
            null = torch.full_like(context, self.num_classes)
            context = torch.cat([context, null])
        rows = 2 * b if guided else b
        patches: list[Tensor] = []  # x_0 .. x_{i-1}, each (B, 1, d); concatenated once at the end
        alphas: list[Tensor] = []
        kv = self.transformer.new_cache() if cache else None
        for i in range(n):
            if cache:
                if i == 0:
                    token = self._start_token(rows, context, z)
                else:
                    prev = torch.cat([patches[-1], patches[-1]]) if guided else patches[-1]
                    token = self.proj_in(prev)
                h = self.transformer(token + self.position[:, i : i + 1], kv)
            else:
                # The known patches and a placeholder for patch i, which the shift keeps out of token i.
                prefix = torch.cat([*patches, torch.zeros_like(z[:, :1])], dim=1)
                prefix = torch.cat([prefix, prefix]) if guided else prefix
                h = self.transformer(self._tokens(prefix, context))[:, -1:]
            mu, alpha = self._params(h)
            if guided:
                mu = (1 + guidance) * mu[:b] - guidance * mu[b:]
                alpha = (1 + guidance) * alpha[:b] - guidance * alpha[b:]
            patches.append(z[:, i : i + 1] * torch.exp(alpha) + mu)
            alphas.append(alpha)
        x = torch.cat(patches, dim=1)
        logdet = sum_except_batch(torch.cat(alphas, dim=1))
        return (x.flip(1) if self.reverse else x), logdet
