"""The Lightning layer: module, data module, callbacks."""

from glowlab.training.callbacks import AtomicCheckpointIO, GlowCheckpoint, Preemption, SampleGrid, Throughput
from glowlab.training.datamodule import ShardDataModule
from glowlab.training.loggers import GlowWandbLogger, ResumableCSVLogger
from glowlab.training.module import GlowModule

__all__ = [
    "AtomicCheckpointIO",
    "GlowCheckpoint",
    "GlowModule",
    "GlowWandbLogger",
    "Preemption",
    "ResumableCSVLogger",
    "SampleGrid",
    "ShardDataModule",
    "Throughput",
]
