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
from glowlab.flows.nn import ZeroConv2d, interleaved_halves


class Split(Flow):
    """Factor-out step: the last ``C - C//2`` channels get a Gaussian prior conditioned on the rest.

    ``forward`` keeps the first ``C // 2`` channels and replaces the others by their standardised
    values under N(mean(h), exp(logs(h))^2), where ``h`` is the kept half and a zero-initialised
    conv gives ``mean`` and ``logs``. The output has the input's shape; :meth:`chunk` separates the
    kept half (which flows on to the next level) from the factored-out latent.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.keep = num_channels // 2
        # Output [mean | log-scale] (parameters interleaved, as in the reference implementation).
        self.prior = ZeroConv2d(self.keep, 2 * (num_channels - self.keep), halves=True)

    def chunk(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(kept, factored)`` halves of a forward output."""
        return y[:, : self.keep], y[:, self.keep :]

    def _mean_logs(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.prior(h).chunk(2, dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, z = self.chunk(x)
        mean, logs = self._mean_logs(h)
        return torch.cat([h, (z - mean) * (-logs).exp()], dim=1), -sum_except_batch(logs)

    def inverse(self, y: Tensor) -> Tensor:
        h, eps = self.chunk(y)
        mean, logs = self._mean_logs(h)
        return torch.cat([h, eps * logs.exp() + mean], dim=1)


class TopPrior(Flow):
    """Learned prior of the last level, optionally conditioned on a class label.

    ``mean`` and ``logs`` are learned per channel and position (``learn_top``; otherwise the prior
    is N(0, I)); with ``num_classes`` a zero-initialised linear map of the one-hot label adds a
    per-channel offset to both, as in Glow's class-conditional models. The label is the layer's
    ``context`` (the flow contract's conditioning argument).

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    conditional = True

    def __init__(self, shape: tuple[int, int, int], learn_top: bool = True, num_classes: int | None = None) -> None:
        super().__init__()
        c, h, w = shape
        self.num_classes = num_classes
        self.params = nn.Parameter(torch.zeros(1, 2 * c, h, w)) if learn_top else None
        self.class_embedding = nn.Linear(num_classes, 2 * c) if num_classes else None
        if self.class_embedding is not None:
            nn.init.zeros_(self.class_embedding.weight)
            nn.init.zeros_(self.class_embedding.bias)

    def _mean_logs(self, x: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """``(mean, logs)``, broadcastable against ``x``; None for the fixed N(0, I) prior."""
        p = self.params  # (1, 2C, H, W)
        if self.class_embedding is not None:
            if labels is None:
                raise ValueError("this model is class-conditional (num_classes is set): pass labels y as the context")
            # One-hot by comparison, not F.one_hot: one_hot checks the label range on the host (a
            # device synchronisation), and an embedding lookup's CUDA backward synchronises too.
            classes = torch.arange(self.num_classes, device=labels.device)
            onehot = (labels[:, None] == classes).to(x.dtype)  # (B, num_classes)
            offset = self.class_embedding(onehot).view(x.shape[0], -1, 1, 1)  # (B, 2C) -> (B, 2C, 1, 1)
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
