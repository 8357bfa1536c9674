"""The Lightning layer: module, data module, callbacks."""

from glowlab.training.callbacks import GlowCheckpoint, SampleGrid, sample_grid, save_sample_grid
from glowlab.training.datamodule import ShardDataModule
from glowlab.training.module import GlowModule

__all__ = ["GlowCheckpoint", "GlowModule", "SampleGrid", "ShardDataModule", "sample_grid", "save_sample_grid"]
