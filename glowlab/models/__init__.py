"""Generative models built from :mod:`glowlab.flows`."""

from glowlab.models.density import FAMILIES, FlowModel, make_vector_flow
from glowlab.models.multiscale import (
    ARCHITECTURES,
    FlowStep,
    Glow,
    Level,
    MultiscaleConfig,
    MultiscaleFlow,
    MultiscaleOutput,
)

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "FlowModel",
    "FlowStep",
    "Glow",
    "Level",
    "MultiscaleConfig",
    "MultiscaleFlow",
    "MultiscaleOutput",
    "make_vector_flow",
]
