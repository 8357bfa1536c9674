"""A 2-process DDP run on CPU (gloo), started by test_ddp.py: records what each rank read.

Usage: python tests/ddp_job.py DATA_ROOT OUT_DIR [--compile] [--cuda-graphs] [--ema-variational] [--poison-one-loss]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from helpers import glow_module

from glowlab.training import ShardDataModule, Throughput


class Recorder(L.Callback):
    """Sample indices of every batch, per training epoch and for the test pass; this process's own
    sums of the training values at each epoch's end."""

    def __init__(self) -> None:
        self.train: list[list[int]] = []
        self.test: list[int] = []
        self.epoch_sums: list[dict] = []
        self.ddp_reduces: bool | None = None  # whether DDP's own gradient reduction was on at the end

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train[-1] += batch[2].tolist()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Callbacks run before the module's hook, which logs the mean over the processes.
        means = pl_module.epoch_means
        self.epoch_sums.append({"sums": {k: float(v) for k, v in means.sums.items()}, "count": means.count})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ddp_reduces = trainer.strategy.model.require_backward_grad_sync

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.test += batch[2].tolist()


def main(
    root: str,
    out: str,
    compile_model: bool = False,
    cuda_graphs: bool = False,
    ema_variational: bool = False,
    poison_one_loss: bool = False,
) -> None:
    L.seed_everything(0)
    data = ShardDataModule(
        root=root, batch_size=16, eval_batch_size=50, num_workers=2, shuffle_buffer=16, epoch_size=640
    )
    # Invertible backprop under DDP: its ActNorm init and gradients must agree across ranks too.
    model = glow_module(
        image_shape=data.image_shape,
        n_bins=data.n_bins,
        levels=2,
        steps=2,
        hidden_channels=16,
        warmup_steps=5,
        backprop="invertible",
        compile=compile_model,
        cuda_graphs=cuda_graphs,
        **({"ema_decay": 0.9, "dequantization": "variational", "dequantization_steps": 2} if ema_variational else {}),
    )
    model.capture_backend = "emulated"  # the capture's bookkeeping on a CPU, under DDP
    if poison_one_loss:
        losses = model.losses

        def poisoned(*args, **kwargs):
            # At step 5 on rank 1 only, a loss that is not finite while its gradients are.
            loss, values = losses(*args, **kwargs)
            if model.training and model.global_rank == 1 and model.global_step == 5:
                loss = loss + float("inf")
            return loss, values

        model.losses = poisoned
    recorder = Recorder()
    throughput = Throughput(window=5)  # its FLOPs count spans DDP's forward and backward pass
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder, throughput],
    )
    trainer.fit(model, datamodule=data)
    train_bpd_epoch = float(trainer.callback_metrics["train_bpd_epoch"])
    throughput_logged = sorted(k for k in trainer.callback_metrics if k.startswith("throughput/"))
    trainer.save_checkpoint(Path(out, "end.ckpt"))  # every process, as Lightning's checkpoints are written
    saved_means = torch.load(Path(out, "end.ckpt"), weights_only=False)["train_epoch_means"]
    test_bpd = trainer.test(model, datamodule=data, verbose=False)[0]["test_bpd"]
    rank = trainer.global_rank
    actnorm = model.model.levels[0].layers[1].layers[0]  # first flow step's ActNorm
    record = {
        "train": recorder.train,
        "test": recorder.test,
        "test_bpd": test_bpd,
        "epoch_sums": recorder.epoch_sums,
        "train_bpd_epoch": train_bpd_epoch,
        "saved_epoch_means": saved_means,
        "actnorm_bias": actnorm.bias.flatten().tolist(),
        # Replicas stay equal only if every gradient was all-reduced (a weight average's copy included).
        "parameters": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
        "averaged": model.ema is not None and model.ema.updates,
        "messages": sorted(model._said),
        "captured": model._graph is not None,
        "ddp_reduces": recorder.ddp_reduces,
        "skipped_steps": int(model.nonfinite.total),
        "flops_per_image": throughput.flops_per_image,
        "throughput_logged": throughput_logged,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        torch.save(model.state_dict(), Path(out, "model.pt"))


if __name__ == "__main__":
    options = sys.argv[3:]
    main(
        sys.argv[1],
        sys.argv[2],
        compile_model="--compile" in options,
        cuda_graphs="--cuda-graphs" in options,
        ema_variational="--ema-variational" in options,
        poison_one_loss="--poison-one-loss" in options,
    )
