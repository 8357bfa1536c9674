"""A small classifier whose features stand in for InceptionV3 on tiny data sets (e.g. the digits).

Inception features of 8x8 grey digits upscaled to 299x299 say little about digit quality, so, as
is usual for MNIST-like data, FID on such sets uses the penultimate layer of a classifier trained
on the same data. ``glowlab evaluate train-classifier`` trains it and saves it next to the data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glowlab.files import write_atomic

CLASSIFIER_FILE = "fid_classifier.pt"


def to_uint8(levels: Tensor, n_bins: int) -> Tensor:
    """Integer levels ``0..n_bins-1`` as uint8 intensities ``0..255`` (what feature extractors take)."""
    return torch.round(levels.float() * 255.0 / (n_bins - 1)).clamp(0, 255).to(torch.uint8)


class FeatureClassifier(nn.Module):
    """Three conv layers, global pooling and a ``feature_dim`` hidden layer; ``forward`` gives features.

    Takes uint8 images (B, C, H, W); ``logits`` adds the class layer on top of the features.

    References: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
    Nash Equilibrium" (FID), NeurIPS 2017.
    """

    def __init__(self, in_channels: int, num_classes: int, feature_dim: int = 64) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "feature_dim": feature_dim}
        self.num_features = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 128, 1, 1) -> (B, 128)
            nn.Linear(128, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.body(images.float() / 255.0 - 0.5)

    def logits(self, images: Tensor) -> Tensor:
        return self.head(self(images))


def manifest_digest(data_root: str) -> str:
    """A short fingerprint of a prepared data set (its manifest), to key caches and classifiers."""
    import json

    from glowlab.data.shards import read_manifest

    return hashlib.sha256(json.dumps(read_manifest(data_root), sort_keys=True).encode()).hexdigest()[:16]


def train_classifier(
    data_root: str,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    out: str | Path | None = None,
    device: str = "cpu",
) -> dict:
    """Train on the train split, report val accuracy, save to ``out`` (default: next to the data).

    Deterministic for a ``seed``: the same seed gives bitwise the same weights on CPU (with the same
    torch build and thread count), so a classifier-feature FID can be reproduced. The saved record
    holds the seed, epochs, learning rate and batch size beside the weights and val accuracy.
    """
    from glowlab.data.prepare import sha256_of
    from glowlab.data.shards import read_samples
    from glowlab.training.datamodule import ShardDataModule

    # The data order (shard order, shuffle buffer) comes from the data module's own seeded
    # random.Random streams, never from the global random or numpy generators, so ``seed`` fixes it.
    data = ShardDataModule(root=data_root, batch_size=batch_size, shuffle_buffer=4096, seed=seed)
    if not data.num_classes:
        raise ValueError(f"{data_root}: the data has no labels; a feature classifier needs them")
    # The initial weights are the only draw from torch's generator; fork it so that seeding here
    # neither depends on nor changes the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureClassifier(data.image_shape[0], data.num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = data.train_dataloader()
    for _ in range(epochs):
        for levels, labels, _ in loader:
            loss = F.cross_entropy(model.logits(to_uint8(levels, data.n_bins).to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    val = read_samples(data_root, "val", limit=data.split_size("val"))
    with torch.no_grad():
        predicted = model.eval().logits(to_uint8(val.levels, data.n_bins).to(device)).argmax(1).cpu()
    accuracy = float((predicted == val.labels).float().mean()) if len(val.labels) else float("nan")
    path = Path(out) if out else Path(data_root) / CLASSIFIER_FILE
    record = {
        "state_dict": model.cpu().state_dict(),
        "config": model.config,
        "n_bins": data.n_bins,
        "image_shape": list(data.image_shape),
        "data": manifest_digest(data_root),
        "val_accuracy": accuracy,
        "seed": seed,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
    }
    write_atomic(path, lambda f: torch.save(record, f))
    return {
        "path": str(path),
        "sha256": sha256_of(path),
        "val_accuracy": accuracy,
        "val_images": len(val.labels),
        "seed": seed,
        "epochs": epochs,
        "data": record["data"],
    }


def load_classifier(path: str | Path) -> tuple[FeatureClassifier, dict]:
    """The classifier saved by :func:`train_classifier` (in eval mode) and its record (data digest,
    val accuracy; seed and epochs in files written since they were recorded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no feature classifier; train one with `glowlab evaluate train-classifier --data DATA_ROOT`"
        )
    record = torch.load(path, map_location="cpu", weights_only=True)
    model = FeatureClassifier(**record["config"])
    model.load_state_dict(record["state_dict"])
    return model.eval(), record
