"""A model's data contract against a data set's: one check, one message, for every route.

``glowlab fit``/``validate``/``test`` (through a checkpoint) and every job that puts data through
a trained image model compare the model's image shape, grey levels and classes with the data's
and stop with the same message when they differ.
"""

from __future__ import annotations

from glowlab.data.shards import DataContract
from glowlab.models.multiscale import MultiscaleConfig


def describe(config: MultiscaleConfig) -> str:
    """``1x8x8 images with 17 grey levels, 10 classes``: what a model is for."""
    classes = f", {config.num_classes} classes" if config.num_classes else ""
    return f"{'x'.join(map(str, config.image_shape))} images with {config.n_bins} grey levels{classes}"


def mismatch(config: MultiscaleConfig, data: DataContract, model_name: str, data_name: str) -> str | None:
    """The message naming both sides if a model for ``config`` cannot score ``data``; None if it can."""
    differs = (
        data.image_shape != config.image_shape
        or data.n_bins != config.n_bins
        or (config.num_classes is not None and (data.num_classes is None or data.num_classes > config.num_classes))
    )
    if not differs:
        return None
    return f"{model_name} models {describe(config)}; {data_name} holds {data.describe()}"
