"""How many CPU threads torch uses in a glowlab process: the ``threads`` option of every command.

torch's default is the machine's physical core count, whatever share of the machine the process
may use: a SLURM task given 4 cores of a 64-core node, or two processes on a 2-core machine,
then run more threads than cores, and small operators spend their time waiting for each other (a
2-D MAF step took 600 ms with the default and 10 ms with one thread on a shared 2-core machine).
``auto`` avoids that; an integer sets the count. Importing this module does not import torch.
"""

from __future__ import annotations

import os
import sys

AUTO = "auto"


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: cgroup/SLURM limits included)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(value: int | str, processes: int = 1, small_model: bool = False) -> int:
    """The thread count for ``threads`` = ``value`` (``auto`` or an integer >= 1).

    ``auto``: ``OMP_NUM_THREADS`` when it is set (the site's or the user's choice, e.g.
    ``slurm/common.sh`` sets it to the task's cores); 1 for ``small_model`` (the density lab's
    vector flows, whose operators are too small to share among threads); otherwise the usable
    cores divided among the ``processes`` that share this machine (DDP on CPU), at least 1.
    """
    if isinstance(value, str) and value.strip().lower() == AUTO:
        given = os.environ.get("OMP_NUM_THREADS", "").strip()
        if given.isdigit() and int(given) >= 1:
            return int(given)
        if small_model:
            return 1
        return max(1, usable_cores() // max(1, processes))
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1 or (isinstance(value, float) and value != count):
        raise ValueError(f"threads {value!r}: a number of threads >= 1, or auto")
    return count


def apply_threads(value: int | str, processes: int = 1, small_model: bool = False) -> int:
    """Set torch's intra-op thread count (and ``OMP_NUM_THREADS`` for child processes); returns it.

    ``OMP_NUM_THREADS`` is also what Lightning's DDP launcher and DataLoader workers read, so the
    processes a run starts follow the same setting.
    """
    count = resolve_threads(value, processes, small_model)
    os.environ["OMP_NUM_THREADS"] = str(count)
    if "torch" in sys.modules:
        import torch

        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
    return count
