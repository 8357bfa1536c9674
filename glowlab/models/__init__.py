"""Generative models built from :mod:`glowlab.flows`."""

from glowlab.models.density import FAMILIES, FlowModel, make_vector_flow
from glowlab.models.multiscale import (
    ARCHITECTURES,
    FlowStep,
    Glow,
    ImageFlow,
    Level,
    MultiscaleConfig,
    MultiscaleFlow,
    MultiscaleOutput,
    image_flow,
)

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "FlowModel",
    "FlowStep",
    "Glow",
    "ImageFlow",
    "Level",
    "MultiscaleConfig",
    "MultiscaleFlow",
    "MultiscaleOutput",
    "image_flow",
    "make_vector_flow",
]
