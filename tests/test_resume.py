"""Exact resume: a run stopped mid-epoch and resumed matches an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from datasets import prepared_digits
from helpers import SignalAfterStep, glow_module, quiet_trainer

from glowlab.training import GlowCheckpoint, GlowModule, Preemption, ShardDataModule


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.indices: list[int] = []
        self.epoch_means: list[float] = []  # each finished epoch's train_bpd_epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.indices += batch[2].tolist()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if "train_bpd_epoch" in trainer.callback_metrics:
            self.epoch_means.append(float(trainer.callback_metrics["train_bpd_epoch"]))


def fit(
    root: Path,
    ckpt_dir: Path,
    max_steps: int,
    resume: Path | None = None,
    accumulate: int = 1,
    callbacks: tuple[L.Callback, ...] = (),
    **options,
) -> tuple[GlowModule, Recorder]:
    L.seed_everything(0)
    data = ShardDataModule(root=str(root), batch_size=32, num_workers=2, shuffle_buffer=64, hflip=True, max_shift=1)
    model = glow_module(
        image_shape=data.image_shape,
        n_bins=data.n_bins,
        levels=2,
        steps=2,
        hidden_channels=16,
        warmup_steps=5,
        **options,
    )
    recorder = Recorder()
    trainer = quiet_trainer(
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=True,
        callbacks=[recorder, GlowCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True), *callbacks],
        default_root_dir=ckpt_dir,
    )
    trainer.fit(model, datamodule=data, ckpt_path=resume)
    return model, recorder


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return prepared_digits(tmp_path_factory.mktemp("digits"), shard_size=200)


@pytest.mark.parametrize(
    ("stop", "accumulate", "options"),
    [
        (21, 1, {}),
        (9, 2, {}),
        (13, 1, {"ema_decay": 0.9, "dequantization": "variational"}),
        # the transformer flow's noise augmentation and label dropout draw per batch
        (13, 1, {"architecture": "transformer", "noise_std": 0.05, "num_classes": 10, "label_dropout": 0.5}),
    ],
    ids=["plain", "accumulate", "ema-variational", "transformer-noise-labels"],
)
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(
    digits, tmp_path, stop: int, accumulate: int, options: dict
) -> None:
    total = 50 // accumulate
    reference, reference_run = fit(digits, tmp_path / "a", total, accumulate=accumulate, **options)
    _, first_run = fit(digits, tmp_path / "b", stop, accumulate=accumulate, **options)
    resumed, second_run = fit(
        digits, tmp_path / "b2", total, resume=tmp_path / "b" / "last.ckpt", accumulate=accumulate, **options
    )
    first, second, reference_order = first_run.indices, second_run.indices, reference_run.indices
    if "ema_decay" in options:  # the weight average and the dequantizer are part of the state that resumes exactly
        assert resumed.ema.updates == reference.ema.updates == total
        assert any(k.startswith("ema.model.dequantizer.") for k in resumed.state_dict())
    # 39 micro-batches of 32 make an epoch (1258 images), so both stops fall inside the first epoch.
    assert first + second == reference_order
    assert len(reference_order) == total * 32  # batch_size 32 is the global batch of one optimizer step
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_preempted_and_resumed_run_reports_the_whole_epochs_mean(digits, tmp_path, monkeypatch) -> None:
    """The first epoch's ``train_bpd_epoch`` of a run stopped by SIGTERM after step 21 (of 39 in
    the epoch) and resumed from its checkpoint covers the batches before the stop too: the epoch's sums
    are in the checkpoint. (Lightning's own epoch accumulation would restart empty.)"""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _, reference = fit(digits, tmp_path / "a", 50)
    _, first = fit(digits, tmp_path / "b", 50, callbacks=(Preemption(), SignalAfterStep(at=21)))
    checkpoint = tmp_path / "b" / "checkpoints" / "preempted.ckpt"
    assert 21 <= torch.load(checkpoint, weights_only=False)["global_step"] < 39  # within the first epoch
    _, resumed = fit(digits, tmp_path / "b2", 50, resume=checkpoint)
    assert first.indices + resumed.indices == reference.indices
    assert len(reference.epoch_means) == len(resumed.epoch_means) == 1
    assert resumed.epoch_means[0] == pytest.approx(reference.epoch_means[0], rel=1e-5)
