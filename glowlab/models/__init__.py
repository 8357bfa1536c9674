"""Generative models built from :mod:`glowlab.flows`."""

from glowlab.models.glow import FlowStep, Glow, GlowOutput

__all__ = ["FlowStep", "Glow", "GlowOutput"]
