"""LightningDataModule over prepared WebDataset shards."""

from __future__ import annotations

import math
import multiprocessing
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from glowlab.data.shards import (
    BAD_SAMPLE_POLICIES,
    Augment,
    ShardStream,
    data_contract,
    read_manifest,
    shard_counts,
    shard_urls,
)
from glowlab.likelihood import dequantize, per_sample_uniform

# The policies as a type, so that `glowlab fit --help` lists them and the parser refuses others
# (tests/test_help.py checks it names exactly BAD_SAMPLE_POLICIES).
BadSamples = Literal["error", "skip"]


class _TrainLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch.

    Lightning saves its (empty) state in checkpoints and, on resume, calls ``load_state_dict``
    after restoring its own progress counters and before iterating: the loader then reads how many
    batches were completed, has each worker pass over the finished epochs without decoding, and
    drops the batches of the interrupted epoch that were already trained on.
    """

    def __init__(self, dataset: ShardStream, datamodule: ShardDataModule, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self._datamodule = datamodule
        self._drop = 0

    def state_dict(self) -> dict:
        return {"format": "glowlab-shard-stream", "version": 1}

    def load_state_dict(self, state: dict) -> None:
        done = self._datamodule.completed_training_batches()
        per_epoch = len(self)
        self.dataset.skip_epochs, self._drop = divmod(done, per_epoch)
        self._datamodule.train_batches = done

    def __iter__(self) -> Any:
        iterator = super().__iter__()
        for _ in range(self._drop):
            next(iterator)
        self._drop = 0
        return iterator


class ShardDataModule(L.LightningDataModule):
    """Train/val/test batches from a data set written by ``glowlab prepare``.

    ``root`` is the folder (or URL / ``pipe:`` prefix) holding ``manifest.json`` and the shards. The
    manifest fixes the image shape, class count and grey levels; ``n_bits`` (default: the
    manifest's hint, else all levels) keeps the top bits of 8-bit data. Batches leave the loader as
    integer levels and are dequantized after the transfer to the device: fresh noise per training
    batch (seeded by ``seed``, the rank and the batch number, so a resumed run draws what the
    uninterrupted one would have), and noise fixed per sample (by ``eval_noise_seed`` and the
    sample index) for validation and test, so their bits/dim do not depend on the number of
    devices or workers. A batch is ``(x, labels, indices, levels)``: the dequantized images, and
    the integer images they came from (a model with variational dequantization redraws the noise
    within each bin). ``batch_size`` is the global batch of one optimizer step: each device gets
    ``batch_size / (devices x accumulate_grad_batches)`` images a micro-batch, so changing the
    device count keeps the optimisation the same. ``eval_batch_size`` is per device. ``hflip`` and
    ``max_shift`` augment training images; ``bad_samples="skip"`` skips and counts bad samples
    instead of stopping. ``epoch_size`` (samples per epoch, default the training split) sets how
    many batches make an epoch; every rank runs the same number. ``test_split`` is the split the
    test loop reads (``"test"``; evaluation jobs may point it at ``"val"`` or ``"train"``).
    ``verify_shards`` checks each shard's sha256 against the manifest the first time a process
    reads it (:func:`glowlab.data.shards.verify_shard`), so a changed shard is refused.
    ``cache_mib`` is the memory each loader process (the main one or a worker) may keep its shards
    in, read and decoded, per split: a data set that fits is read from disk and decoded once per
    process instead of on every pass (0: no cache). Batches are the same either way.

    References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def __init__(
        self,
        root: str = "data/digits",
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        n_bits: int | None = None,
        hflip: bool = False,
        max_shift: int = 0,
        bad_samples: BadSamples = "error",
        epoch_size: int | None = None,
        seed: int = 0,
        eval_noise_seed: int = 0,
        test_split: str = "test",
        verify_shards: bool = True,
        cache_mib: float = 1024,
    ) -> None:
        super().__init__()
        if bad_samples not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"data.bad_samples={bad_samples!r}: choose one of {', '.join(BAD_SAMPLE_POLICIES)}")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be >= 1")
        if shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer={shuffle_buffer} must be >= 1 (1: no shuffling)")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        if not (math.isfinite(cache_mib) and cache_mib >= 0):
            raise ValueError(
                f"data.cache_mib={cache_mib} must be a finite number >= 0 (0: read and decode the shards on every pass)"
            )
        if epoch_size is not None and epoch_size < 1:
            raise ValueError(f"data.epoch_size={epoch_size} must be >= 1")
        # Reading the manifest here (a small file, no download) lets the model take its shape from it.
        self.manifest = read_manifest(root)
        self.contract = data_contract(root, self.manifest, n_bits)
        if not 0 <= max_shift < min(self.contract.image_shape[1:]):
            raise ValueError(
                f"data.max_shift={max_shift} must be in 0..{min(self.contract.image_shape[1:]) - 1} for the "
                f"{'x'.join(map(str, self.contract.image_shape[1:]))} images of {root}"
            )
        self.root = root
        self.n_bits = self.contract.n_bits
        self.n_bins = self.contract.n_bins
        self.image_shape = self.contract.image_shape
        self.num_classes: int | None = self.contract.num_classes
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.augment = Augment(hflip, max_shift) if hflip or max_shift else None
        self.bad_samples, self.epoch_size = bad_samples, epoch_size
        self.verify_shards, self.cache_mib = verify_shards, cache_mib
        self.seed, self.eval_noise_seed = seed, eval_noise_seed
        if test_split not in self.manifest["splits"]:
            raise ValueError(f"data.test_split={test_split!r}: {root} has splits {', '.join(self.manifest['splits'])}")
        self.test_split = test_split
        self._skipped = multiprocessing.get_context().Value("q", 0)
        self.train_batches = 0  # training micro-batches dequantized so far on this rank

    @property
    def skipped_samples(self) -> int:
        """Bad samples or shards skipped so far by this process's loaders (``bad_samples="skip"``)."""
        return int(self._skipped.value)

    def split_size(self, split: str) -> int:
        return int(self.manifest["splits"][split]["count"])

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def micro_batch_size(self) -> int:
        """Images per device and micro-batch: the global batch over devices and accumulation steps."""
        _, world = self._rank_world()
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        if self.batch_size % (world * accumulate):
            raise ValueError(
                f"data.batch_size={self.batch_size} is the global batch; it must divide evenly over "
                f"{world} device(s) x {accumulate} accumulation step(s)"
            )
        return self.batch_size // (world * accumulate)

    def completed_training_batches(self) -> int:
        """Training micro-batches this rank has finished, from the trainer's restored progress."""
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.total
        # A checkpoint written at the end of a batch counts that batch as processed, not completed.
        ended_batch = (
            progress.processed == progress.started == progress.ready and progress.completed == progress.processed - 1
        )
        return progress.processed if ended_batch else progress.completed

    def _stream(self, split: str, train: bool) -> ShardStream:
        rank, world = self._rank_world()
        urls = shard_urls(self.root, self.manifest, split)
        counts = shard_counts(self.manifest, split)
        size = self.split_size(split)
        if train:
            micro = self.micro_batch_size()
            accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
            per_epoch = (self.epoch_size or size) // self.batch_size * accumulate  # micro-batches per rank
            if per_epoch < 1:
                raise ValueError(
                    f"data.batch_size={self.batch_size} (global) needs at least that many training images "
                    f"per epoch; {self.root} has {self.epoch_size or size}"
                )
        elif size == 0:
            raise ValueError(f"the {split} split of {self.root} is empty (prepared with a fraction of 0?)")
        elif size < world:
            raise ValueError(f"the {split} split of {self.root} has {size} images, fewer than the {world} devices")
        return ShardStream(
            urls,
            counts,
            self.manifest,
            micro if train else self.eval_batch_size,
            train=train,
            rank=rank,
            world_size=world,
            num_workers=self.num_workers,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            batches_per_epoch=per_epoch if train else None,
            augment=self.augment if train else None,
            n_bits=self.n_bits,
            bad_samples=self.bad_samples,
            skipped=self._skipped,
            verify=self.verify_shards,
            cache_mib=self.cache_mib,
        )

    def _loader(self, split: str, train: bool) -> DataLoader:
        options = dict(
            batch_size=None,  # the stream batches, so each rank's batch count is exact
            num_workers=self.num_workers,
            # Persistent workers keep the training stream's position from one epoch to the next.
            persistent_workers=self.num_workers > 0 and train,
            pin_memory=torch.cuda.is_available(),
        )
        stream = self._stream(split, train)
        return _TrainLoader(stream, self, **options) if train else DataLoader(stream, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, train=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        levels, labels, indices = batch
        if self.trainer is not None and self.trainer.training:
            rank, _ = self._rank_world()
            generator = torch.Generator(device=levels.device)
            generator.manual_seed((self.seed * 1_000_003 + rank) * 1_000_000_007 + self.train_batches)
            self.train_batches += 1
            return dequantize(levels, self.n_bins, generator=generator), labels, indices, levels
        noise = per_sample_uniform(indices.cpu(), tuple(levels.shape[1:]), self.eval_noise_seed)
        return dequantize(levels, self.n_bins, noise=noise), labels, indices, levels
