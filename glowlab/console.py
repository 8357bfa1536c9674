"""Console hygiene shared by every command: what glowlab keeps out of a run's output (no torch import)."""

from __future__ import annotations

import logging
import os
import warnings

# Lightning and W&B messages that say nothing about this run: advertisements, deprecations inside
# the libraries, and a hint about srun that only applies inside a SLURM allocation.
_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*Your `IterableDataset` has `__len__` defined.*",  # the shard stream splits its length by worker
    r".*The `srun` command is available on your system but is not used.*",
    r".*does not have many workers which may be a bottleneck.*",
    r".*LightningCLI.s args parameter is intended to run from within Python.*",  # glowlab density passes its own
)


def quiet_console() -> None:
    """Keep a run's console output to what concerns it; ``GLOWLAB_VERBOSE=1`` keeps everything.

    Lightning's informational lines (accelerator inventory, tips for other products, "Seed set")
    go; its warnings stay. W&B's own banner goes too (``WANDB_SILENT`` set by the user wins): the
    run prints one line with its W&B run id and, offline, the ``wandb sync`` command to upload it.
    """
    if os.environ.get("GLOWLAB_VERBOSE"):
        return
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.fabric.utilities.seed",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("WANDB_SILENT", "true")
    for message in _NOISE:
        warnings.filterwarnings("ignore", message=message)


def glowlab_logger() -> logging.Logger:
    """glowlab's own messages (INFO and up, to stderr, one line each), which ``quiet_console`` keeps.

    Lightning's informational logger is silenced; glowlab's lines (what a fast path did, why it was
    not used) must not go with it.
    """
    log = logging.getLogger("glowlab")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    return log
