"""glowlab: normalizing flows for image generation research, from one laptop to a SLURM cluster.

``glowlab.load(path)`` returns a trained model from a checkpoint or an exported folder.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `import glowlab` (and `glowlab prepare`) stays fast.
    if name in ("load", "export"):
        from glowlab.models import io

        return getattr(io, name)
    raise AttributeError(f"module 'glowlab' has no attribute {name!r}")
