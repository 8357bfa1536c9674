"""``glowlab evaluate bpd``: test-set bits/dim over several dequantization draws, DDP-aware."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from glowlab.likelihood import (
    bits_per_dim,
    importance_weighted_bits_per_dim,
    per_sample_uniform,
)
from glowlab.models import ImageFlow


class BpdEvaluation(L.LightningModule):
    """Per-image bits/dim averaged over ``draws`` seeded dequantizations; sums reduced over ranks.

    Draw ``d`` uses the per-image noise of seed ``d``; draw 0 is the noise validation and test use
    during training, so one draw reproduces the logged numbers exactly. A model with variational
    dequantization turns each draw into its learned noise and the bound carries ``log q(u | k)``
    (:meth:`~glowlab.models.ImageFlow.log_bound`).

    References: Theis et al., "A note on the evaluation of generative models", ICLR 2016.
    """

    def __init__(self, model: ImageFlow, draws: int = 4, importance: bool = False) -> None:
        super().__init__()
        if draws < 1:
            raise ValueError(f"--draws must be >= 1, got {draws}")
        self.model, self.n_bins, self.draws, self.importance = model, model.n_bins, draws, importance
        # [count, sum, sum of squares, the K draws' sums, and the importance-weighted bound's sum and sum of squares]
        self.register_buffer("sums", torch.zeros(5 + draws, dtype=torch.float64), persistent=False)
        self.seen: list[Tensor] = []
        self.per_image: list[Tensor] = []

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, y, indices, levels = batch  # levels: the exact integer images behind the batch
        y = y if self.model.num_classes else None
        per_draw = []
        # Several draws go through the model as one batch (up to MAX_BATCH images): fewer, larger passes.
        group = max(1, MAX_BATCH // max(1, len(levels)))
        for first in range(0, self.draws, group):
            seeds = range(first, min(first + group, self.draws))
            noise = torch.cat([per_sample_uniform(indices.cpu(), tuple(levels.shape[1:]), seed=d) for d in seeds])
            repeated = levels.repeat(len(seeds), *([1] * (levels.dim() - 1)))  # (B, ...) -> (G * B, ...)
            labels = y.repeat(len(seeds)) if y is not None else None
            # log p(x) - log q(u | k): with variational dequantization the draw is the learned noise's.
            log_bound = self.model.log_bound(repeated, noise.to(x.device), labels)
            per_draw += bits_per_dim(log_bound, self.model.num_dims, self.n_bins).double().view(len(seeds), -1)
        per_draw_t = torch.stack(per_draw)  # (draws, B)
        bad = ~torch.isfinite(per_draw_t).all(dim=0)
        if bool(bad.any()):
            raise ValueError(
                f"bits/dim is not finite for image(s) {indices[bad.cpu()].tolist()[:5]}: the model gives them no "
                "density; no mean is reported over the other images"
            )
        per_image = per_draw_t.mean(dim=0)
        bound = importance_weighted_bits_per_dim(per_draw_t, self.model.num_dims)
        self.sums += torch.cat(
            [
                torch.stack([per_image.new_tensor(len(per_image)), per_image.sum(), (per_image**2).sum()]),
                per_draw_t.sum(1),
                torch.stack([bound.sum(), (bound**2).sum()]),
            ]
        )
        self.seen.append(indices.cpu())
        self.per_image.append(per_image.detach().cpu())

    def scores(self) -> tuple[Tensor, Tensor]:
        """``(indices, bits/dim)`` of every image this process evaluated, sorted by index."""
        indices, values = torch.cat(self.seen), torch.cat(self.per_image)
        order = torch.argsort(indices)
        return indices[order], values[order]

    def results(self) -> dict:
        """Mean and standard error over images (call after ``trainer.test``; sums are all-reduced)."""
        sums = self.sums.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        n, total, total_sq = sums[:3].tolist()
        mean, stderr = _mean_stderr(n, total, total_sq)
        results = {
            "bpd": mean,
            "stderr": stderr,
            "num_images": int(n),
            "draws": self.draws,
            "bpd_per_draw": [v / n for v in sums[3 : 3 + self.draws].tolist()],
        }
        if self.importance:
            bound, bound_stderr = _mean_stderr(n, *sums[3 + self.draws :].tolist())
            results["importance_weighted"] = {"draws": self.draws, "bpd": bound, "stderr": bound_stderr}
        return results


MAX_BATCH = 1024  # images per model pass when several dequantization draws are batched together


def _mean_stderr(n: float, total: float, total_sq: float) -> tuple[float, float]:
    """Mean over ``n`` images and its standard error, from the sum and the sum of squares."""
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0) * n / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def evaluate_bpd(
    *,
    ckpt: str,
    data_root: str,
    split: str = "test",
    draws: int = 4,
    batch_size: int = 256,
    devices: int | str = 1,
    accelerator: str = "auto",
    out: str | Path | None = None,
    num_workers: int = 0,
    importance: bool = False,
) -> dict:
    """Bits/dim of ``ckpt`` on ``split`` of the prepared data at ``data_root``; writes JSON to ``out``.

    With ``importance`` the result also holds the importance-weighted bound over the ``draws``
    (``importance_weighted``: its mean over images and standard error).
    """
    from glowlab.files import write_json
    from glowlab.jobs.common import check_data, load_image_model
    from glowlab.training.datamodule import ShardDataModule

    model = load_image_model(ckpt, "cpu")
    check_data(model, ckpt, data_root)
    data = ShardDataModule(root=data_root, eval_batch_size=batch_size, num_workers=num_workers, test_split=split)
    evaluation = BpdEvaluation(model, draws, importance)
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, logger=False, enable_progress_bar=True, enable_model_summary=False
    )
    trainer.test(evaluation, datamodule=data, verbose=False)
    results = {
        **evaluation.results(),
        "split": split,
        "data": data_root,
        "checkpoint": str(ckpt),
        "weights": getattr(model, "weights", "trained"),
        "dequantization": model.config.dequantization,
    }
    expected = data.split_size(split) - data.skipped_samples
    if results["num_images"] != expected:
        raise RuntimeError(f"evaluated {results['num_images']} images but the {split} split has {expected}")
    if trainer.is_global_zero:
        if out is not None:
            write_json(out, results)
        bound = results.get("importance_weighted")
        print(
            f"{split} bits/dim {results['bpd']:.4f} ± {results['stderr']:.4f} (s.e.) over {results['num_images']} "
            f"images, {draws} {model.config.dequantization} dequantization draws, {results['weights']} weights"
            + (f"; importance-weighted bound (K={draws}) {bound['bpd']:.4f} ± {bound['stderr']:.4f}" if bound else "")
            + (f" -> {out}" if out else "")
        )
    return results
