"""The Lightning layer: module, data module, callbacks."""

from glowlab.training.callbacks import GlowCheckpoint, SampleGrid, sample_grid, save_sample_grid
from glowlab.training.datamodule import ImageArrayDataModule
from glowlab.training.module import GlowModule

__all__ = ["GlowCheckpoint", "GlowModule", "ImageArrayDataModule", "SampleGrid", "sample_grid", "save_sample_grid"]
