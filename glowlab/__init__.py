"""glowlab: multiscale Glow and other normalizing flows for image generation research."""

__version__ = "0.1.0"
