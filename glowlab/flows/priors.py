"""Learned Gaussian priors of a multiscale flow, written as flow layers.

A latent ``z`` with prior N(mean, exp(logs)^2) is the same model as the standardised
``eps = (z - mean) · exp(-logs)`` under N(0, I), with ``-sum(logs)`` added to the log-determinant.
Writing each prior this way keeps every layer a bijection with the ``(y, logdet)`` contract and
makes the whole model's base density a plain standard normal; sampling at temperature T draws
``eps ~ N(0, T^2 I)``, which is the prior with its standard deviation scaled by T.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from glowlab.flows.base import Flow, _accumulation_dtype, sum_except_batch
from glowlab.flows.nn import ZeroConv2d, class_embedding, class_offset, interleaved_halves

# How a class label conditions a multiscale flow: the top prior's mean and scale by an offset per
# channel (Glow's "top") or per channel and position ("top-position"); every prior, the splits' too
# ("priors"); or every prior and every coupling network ("couplings").
CONDITIONINGS = ("top", "top-position", "priors", "couplings")


class Split(Flow):
    """Factor-out step: the last ``C - C//2`` channels get a Gaussian prior conditioned on the rest.

    ``forward`` keeps the first ``C // 2`` channels and replaces the others by their standardised
    values under N(mean(h), exp(logs(h))^2), where ``h`` is the kept half and a zero-initialised
    conv gives ``mean`` and ``logs``. The output has the input's shape; :meth:`chunk` separates the
    kept half (which flows on to the next level) from the factored-out latent. With
    ``num_classes`` (and the latent's ``spatial`` size) the layer is conditional: a zero-initialised
    linear map of the one-hot label adds an offset per channel and position to ``mean`` and
    ``logs``, so the factored-out latent is class-conditional too.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, num_channels: int, num_classes: int | None = None, spatial: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        self.keep = num_channels // 2
        # Output [mean | log-scale] (parameters interleaved, as in the reference implementation).
        self.prior = ZeroConv2d(self.keep, 2 * (num_channels - self.keep), halves=True)
        self.num_classes = num_classes
        self.conditional = num_classes is not None
        self.class_embedding = class_embedding(num_classes, 2 * (num_channels - self.keep) * spatial[0] * spatial[1])

    def chunk(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(kept, factored)`` halves of a forward output."""
        return y[:, : self.keep], y[:, self.keep :]

    def _mean_logs(self, h: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        p = self.prior(h)  # (B, 2(C - keep), H, W)
        if self.class_embedding is not None:
            p = p + class_offset(self.class_embedding, labels, self.num_classes, p.shape, p.dtype)
        return p.chunk(2, dim=1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h, z = self.chunk(x)
        mean, logs = self._mean_logs(h, context)
        return torch.cat([h, (z - mean) * (-logs).exp()], dim=1), -sum_except_batch(logs)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        h, eps = self.chunk(y)
        mean, logs = self._mean_logs(h, context)
        return torch.cat([h, eps * logs.exp() + mean], dim=1)


class TopPrior(Flow):
    """Learned prior of the last level, optionally conditioned on a class label.

    ``mean`` and ``logs`` are learned per channel and position (``learn_top``; otherwise the prior
    is N(0, I)); with ``num_classes`` a zero-initialised linear map of the one-hot label adds an
    offset to both: per channel (as in Glow's class-conditional models) or, with ``per_position``,
    per channel and position (one diagonal Gaussian per class over the whole latent, which lets the
    class shape where strokes go, not only how much of each channel there is). The label is the
    layer's ``context`` (the flow contract's conditioning argument).

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    conditional = True

    def __init__(
        self,
        shape: tuple[int, int, int],
        learn_top: bool = True,
        num_classes: int | None = None,
        per_position: bool = False,
    ) -> None:
        super().__init__()
        c, h, w = shape
        self.num_classes = num_classes
        self.params = nn.Parameter(torch.zeros(1, 2 * c, h, w)) if learn_top else None
        self.positions = h * w if per_position else 1
        self.class_embedding = class_embedding(num_classes, 2 * c * self.positions)

    def _mean_logs(self, x: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """``(mean, logs)``, broadcastable against ``x``; None for the fixed N(0, I) prior."""
        p = self.params  # (1, 2C, H, W)
        if self.class_embedding is not None:
            b, _, h, w = x.shape
            shape = (b, -1, 1, 1) if self.positions == 1 else (b, -1, h, w)  # per channel, or channel and position
            offset = class_offset(self.class_embedding, labels, self.num_classes, shape, x.dtype)
            # Without learn_top the offset still applies at every position: expanded (a view), so the
            # log-determinant below sums it over H x W.
            p = offset.expand(-1, -1, x.shape[2], x.shape[3]) if p is None else p + offset
        return None if p is None else interleaved_halves(p)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        prior = self._mean_logs(x, context)
        if prior is None:
            return x, x.new_zeros(x.shape[0], dtype=_accumulation_dtype(x.dtype))
        mean, logs = prior
        # logs is (1, ...) without labels: one log-determinant for the whole batch.
        return (x - mean) * (-logs).exp(), -sum_except_batch(logs).expand(x.shape[0])

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        prior = self._mean_logs(y, context)
        if prior is None:
            return y
        mean, logs = prior
        return y * logs.exp() + mean
