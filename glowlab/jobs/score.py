"""``glowlab score``: per-sample log-likelihood and bits/dim of a data set under a trained model.

Typical-set caveat: a low score flags an input as unlikely, but a high one does not prove it is
"normal". Likelihood models of images famously give *higher* likelihood to some other data sets
(SVHN under a CIFAR-10 model) because simple, smooth inputs have high density even though samples
never look like them: high-dimensional samples lie in the typical set, not at the mode. Compare
scores against the model's scores on held-out in-distribution data (both tails), or use a
typicality test on batches, rather than thresholding the likelihood from one side.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import torch
from torch import Tensor

from glowlab.data.tabular import load_vector_splits
from glowlab.files import write_text
from glowlab.jobs.args import job_parser
from glowlab.jobs.common import check_data
from glowlab.models import FlowModel, ImageFlow
from glowlab.models.density import log_densities


def _write_rows(path: Path, header: list[str], rows: list[list]) -> Path:
    """The scores as CSV, written atomically (never a half-written score file under the final name)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, text.getvalue())


def _refuse_nonfinite(values: torch.Tensor, ckpt: str | Path) -> None:
    bad = (~torch.isfinite(values)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"{ckpt} gives sample(s) {bad.tolist()[:5]} a non-finite score; refusing to write the file")


def score_vectors(
    model: FlowModel, ckpt: str | Path, data: str, split: str, out: Path, drawn: dict, seed: int = 0
) -> dict:
    """Scores of the vectors of ``data`` (a toy name or a .npz/.csv file) under a density-lab model.

    ``drawn`` is how the model's data module drew its data (a checkpoint records it), so a toy set
    is drawn again exactly as it was for training.
    """
    sizes = {"n_train": 20000, "n_val": 2000, "n_test": 5000, "seed": seed}
    if drawn.get("source") == data:
        # A toy set is regenerated exactly as the model's data module drew it (same sizes and seed).
        sizes.update({k: drawn[k] for k in sizes if k in drawn})
    splits, _ = load_vector_splits(data, sizes["n_train"], sizes["n_val"], sizes["n_test"], sizes["seed"])
    if split not in splits:
        raise ValueError(f"--split {split!r}: {data} has splits {', '.join(sorted(splits))}")
    x = torch.as_tensor(splits[split], dtype=next(model.parameters()).dtype)
    if x.shape[1] != model.features:
        raise ValueError(f"{data}: vectors have {x.shape[1]} features but {ckpt} models {model.features}")
    log_prob = log_densities(model, x).double()
    _refuse_nonfinite(log_prob, ckpt)
    bpd = -log_prob / (x.shape[1] * math.log(2.0))
    rows = [[i, f"{lp:.6f}", f"{b:.6f}"] for i, (lp, b) in enumerate(zip(log_prob.tolist(), bpd.tolist(), strict=True))]
    _write_rows(out, ["index", "log_likelihood_nats", "bits_per_dim"], rows)
    return {"count": len(rows), "mean_log_likelihood": float(log_prob.mean()), "out": str(out)}


def image_scores(model: ImageFlow, data: str, split: str, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """``(indices, bits_per_dim)`` of every image of a split (shape-checked against the model), in index order.

    Each image's dequantization noise is fixed by its index exactly as in evaluation during training.
    """
    import lightning as L

    from glowlab.jobs.bpd import BpdEvaluation
    from glowlab.training.datamodule import ShardDataModule

    datamodule = ShardDataModule(root=data, eval_batch_size=batch_size, test_split=split)
    evaluation = BpdEvaluation(model, draws=1)
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False)
    trainer.test(evaluation, datamodule=datamodule, verbose=False)
    indices, bpd = evaluation.scores()
    order = indices.argsort()
    return indices[order], bpd[order]


def extremes_picture(
    model: ImageFlow, data: str, split: str, indices: Tensor, bpd: Tensor, path: str | Path, count: int = 8
) -> Path:
    """The ``count`` most and least likely images of a split as a PNG of two rows, captioned "#index: bits/dim"."""
    from glowlab.data.shards import read_samples
    from glowlab.images import display, levels_to_model, save_sample_grid

    count = max(1, min(count, len(bpd) // 2 or 1))
    order = bpd.argsort()
    chosen = torch.cat([order[:count], order.flip(0)[:count]])
    samples = read_samples(data, split, indices[chosen].tolist())
    images = display(levels_to_model(samples.levels, model.n_bins, "cpu"), model.n_bins, min_pixels=64)
    captions = [f"#{int(i)}: {b:.2f}" for i, b in zip(indices[chosen], bpd[chosen], strict=True)]
    return save_sample_grid(images, count, path, row_labels=["most likely", "least likely"], captions=captions)


def score_images(
    model: ImageFlow,
    ckpt: str | Path,
    data: str,
    split: str,
    out: Path,
    batch_size: int = 256,
    picture: str | Path | None = None,
) -> dict:
    """Scores of the images of a prepared data set under a Glow/RealNVP/NICE checkpoint.

    The log-likelihood is that of the discrete image (``-bpd · D · log 2`` nats), with each image's
    dequantization noise fixed by its index exactly as in evaluation during training. Rows carry
    the image's class label (empty for unlabelled data); ``picture`` also draws the most and least
    likely images.
    """
    from glowlab.data.shards import read_samples

    check_data(model, ckpt, data)
    indices, bpd = image_scores(model, data, split, batch_size)
    _refuse_nonfinite(bpd, ckpt)
    labels = read_samples(data, split, indices.tolist()).labels.tolist()
    nats = -bpd.double() * model.num_dims * math.log(2.0)
    rows = [
        [i, "" if y < 0 else y, f"{n:.4f}", f"{b:.6f}"]
        for i, y, n, b in zip(indices.tolist(), labels, nats.tolist(), bpd.tolist(), strict=True)
    ]
    _write_rows(out, ["index", "label", "log_likelihood_nats", "bits_per_dim"], rows)
    result = {"count": len(rows), "mean_bits_per_dim": float(bpd.double().mean()), "out": str(out)}
    if picture is not None:
        result["picture"] = str(extremes_picture(model, data, split, indices, bpd, picture))
    return result


def score(
    *, ckpt: str | Path, data: str, split: str = "test", out: str | Path = "scores.csv", picture: str | None = None
) -> dict:
    """Per-sample scores as CSV (``index, [label,] log_likelihood_nats, bits_per_dim``) for either model kind."""
    from glowlab.models.io import load, model_from_checkpoint, read_checkpoint

    out = Path(out)
    drawn: dict = {}
    if Path(ckpt).is_dir():
        model = load(ckpt)
    else:  # read once: the model, and how its data module drew the data
        checkpoint = read_checkpoint(ckpt)
        model = model_from_checkpoint(checkpoint, ckpt)
        drawn = checkpoint.get("datamodule_hyper_parameters", {})
    if isinstance(model, ImageFlow):
        result = score_images(model, ckpt, data, split, out, picture=picture)
    else:
        if picture is not None:
            raise ValueError("--picture draws images: the model is a vector flow of the density lab")
        result = score_vectors(model, ckpt, data, split, out, drawn)
    print(f"scored {result['count']} samples of {data} ({split}) -> {out}")
    return result


def main(argv: list[str]) -> dict:
    """``glowlab score``: per-sample log-likelihood and bits/dim as CSV (see the typical-set caveat in the docs)."""

    parser = job_parser("glowlab score", main.__doc__)
    parser.add_argument("--ckpt", required=True, help="image or density-lab checkpoint, or an exported model folder")
    parser.add_argument("--data", required=True, help="prepared image folder, toy data set name or .npz/.csv file")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default="scores.csv")
    parser.add_argument("--picture", help="image models: also draw the 8 most and least likely images into this PNG")
    args = parser.parse_args(argv)
    return score(ckpt=args.ckpt, data=args.data, split=args.split, out=args.out, picture=args.picture)
