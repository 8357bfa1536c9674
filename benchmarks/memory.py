"""Resident-memory readings shared by the benchmark scripts (Linux ``/proc``).

Peak RSS comes from ``VmHWM`` rather than ``getrusage``: Linux carries ``ru_maxrss`` over an
``exec``, so a worker started from a large benchmark process reports at least its parent's RSS.
"""

from __future__ import annotations

import os
import re


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line; peak RSS needs Linux")
    return int(match.group(1)) / 1024


def current_rss_mib() -> float:
    """Resident memory of this process now, in MiB."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Highest resident memory of this process since it started or :func:`reset_peak_rss`, in MiB."""
    return _status_mib("VmHWM")


def reset_peak_rss() -> None:
    """Start the peak over from the current RSS (writes ``5`` to ``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def live_memory_env() -> dict[str, str]:
    """Environment for a worker whose peak RSS should track live memory.

    Allocations of 64 KiB and more go straight to mmap, so freed activations leave the RSS at once;
    glibc would otherwise keep them cached and serve later steps from that cache.
    """
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
