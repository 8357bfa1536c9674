"""Is the shard loader fast enough? Loader images/s next to Glow's training images/s at the CIFAR config.

Prepares a synthetic 32x32 RGB data set with `glowlab prepare` in a temporary folder, then measures
(1) the training loader (ShardDataModule: shard reading, PNG decoding, shuffle buffer, random
shifts, dequantization) with ``--workers`` worker processes: in its first pass over the data, with
and without the check of every shard's sha256 against the manifest (once per shard and process),
and in a later pass, served from the workers' in-memory cache of read and decoded shards
(``data.cache_mib``); and the hashing rate behind that check, and (2) full training steps (forward,
backward, Adamax step) of the paper's CIFAR-10 Glow (L=3, K=32, width 512, affine, LU) on the same
machine, and prints both and their ratio. A ratio well above 1 means the model, not the loader,
sets the pace.

    python benchmarks/loader_throughput.py                 # CPU: a few minutes on 2 cores
    python benchmarks/loader_throughput.py --device cuda   # the model on a GPU
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from glowlab.data import PrepareOptions, load_source, prepare
from glowlab.data.prepare import sha256_of
from glowlab.likelihood import bits_per_dim
from glowlab.models import Glow
from glowlab.optim import Adamax
from glowlab.training import ShardDataModule


def synthetic_cifar(path: Path, n: int) -> Path:
    """Smooth colour patterns plus noise: PNG-compresses about like CIFAR photos."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    freq = rng.uniform(1, 8, size=(n, 3, 1, 1))
    phase = rng.uniform(0, 6.3, size=(n, 3, 1, 1))
    images = 127.5 * (1 + np.sin(freq * xx + freq[:, ::-1] * yy + phase)) + rng.normal(0, 12, size=(n, 3, 32, 32))
    images = np.clip(images, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)  # (N, 3, 32, 32) -> (N, 32, 32, 3)
    np.savez(path, images=images, labels=rng.integers(0, 10, n))
    return path


def loader_throughput(
    root: Path, workers: int, batch_size: int, batches: int, verify: bool = True, later_pass: bool = False
) -> float:
    """Training images/s the loader delivers, in its first pass over the data or (``later_pass``) in
    the next one, which the workers serve from their caches."""
    data = ShardDataModule(
        root=str(root),
        batch_size=batch_size,
        num_workers=workers,
        shuffle_buffer=2000,
        max_shift=3,
        verify_shards=verify,
    )
    # What the data module reads of a one-process trainer in training: batches are then dequantized
    # with training's fresh noise, not evaluation's per-image noise.
    data.trainer = SimpleNamespace(training=True, global_rank=0, world_size=1, accumulate_grad_batches=1)
    epochs = data.train_dataloader()
    loader = (batch for _ in itertools.count() for batch in epochs)  # epochs continue the stream
    passed = math.ceil(data.split_size("train") / batch_size) if later_pass else 0
    for _ in range(3 + passed):  # workers start and fill their shuffle buffers (and make a first pass)
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        data.on_after_batch_transfer(next(loader), 0)
    return batches * batch_size / (time.perf_counter() - start)


def model_throughput(device: str, batch_size: int, steps: int) -> float:
    torch.manual_seed(0)
    model = Glow(image_shape=(3, 32, 32), levels=3, steps=32, hidden_channels=512, coupling="affine", permutation="lu")
    model.to(device).train()
    optimizer = Adamax(model.parameters(), lr=1e-4)  # the training default
    x = torch.rand(batch_size, 3, 32, 32, device=device) - 0.5

    def step() -> None:
        loss = bits_per_dim(model.log_prob(x), model.num_dims, 256).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # ActNorm initialisation and allocator warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loader-batches", type=int, default=150)
    parser.add_argument("--model-batch-size", type=int, default=16)
    parser.add_argument("--model-steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        npz = synthetic_cifar(Path(tmp) / "cifar.npz", args.images)
        start = time.perf_counter()
        options = PrepareOptions(shard_size=2000, val_fraction=0.05, test_fraction=0.05)
        prepare(load_source("npz", str(npz)), Path(tmp) / "shards", options, workers=args.workers, progress=False)
        prepared = args.images / (time.perf_counter() - start)
        shards = Path(tmp) / "shards"
        loader = loader_throughput(shards, args.workers, args.batch_size, args.loader_batches)
        unchecked = loader_throughput(shards, args.workers, args.batch_size, args.loader_batches, verify=False)
        cached = loader_throughput(shards, args.workers, args.batch_size, args.loader_batches, later_pass=True)
        files = sorted(shards.glob("train-*.tar"))
        start = time.perf_counter()
        for f in files:
            sha256_of(f)
        hashing = sum(f.stat().st_size for f in files) / 2**20 / (time.perf_counter() - start)
        shard_mib = sum(f.stat().st_size for f in files) / 2**20 / len(files)
    model = model_throughput(args.device, args.model_batch_size, args.model_steps)
    processes = max(1, args.workers)
    print(f"prepare            {prepared:10.1f} images/s  ({processes} process(es), PNG shards of 2000)")
    print(f"loader             {loader:10.1f} images/s  (32x32x3, {args.workers} workers, batch {args.batch_size})")
    print(f"loader, unchecked  {unchecked:10.1f} images/s  (the same without the sha256 of each shard)")
    print(f"loader, later pass {cached:10.1f} images/s  (the same, its shards read and decoded in memory)")
    each = 1000 * shard_mib / hashing
    print(f"sha256 of shards   {hashing:10.1f} MiB/s     ({shard_mib:.1f} MiB a shard: {each:.0f} ms each)")
    print(
        f"training (CIFAR)   {model:10.1f} images/s  (L=3 K=32 width 512, batch {args.model_batch_size}, {args.device})"
    )
    print(f"loader / training  {loader / model:10.1f}x")


if __name__ == "__main__":
    main()
