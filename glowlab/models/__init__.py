"""Generative models built from :mod:`glowlab.flows`."""

from glowlab.models.density import FAMILIES, FlowModel, make_vector_flow
from glowlab.models.glow import STEPS, FlowStep, Glow, GlowOutput

__all__ = ["FAMILIES", "STEPS", "FlowModel", "FlowStep", "Glow", "GlowOutput", "make_vector_flow"]
