"""Writing result files so that none is ever half written or holds a number that is not one.

Every writer puts the content in ``NAME.partial`` beside the target, flushes it to disk and renames
it over the target with ``os.replace`` (atomic on one filesystem, and the partial file is always on
the target's filesystem). A crash, a kill or a full disk leaves the previous file or none, never a
truncated one under the final name. JSON is strict: NaN and infinities are refused (they are not
JSON), with the offending key named.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on ``PATH.partial``, sync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) written atomically to ``path``."""
    return write_atomic(path, lambda f: f.write(text.encode()))


def _non_finite(value: Any, where: str) -> str | None:
    """The key path of the first NaN or infinite number in ``value``, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "the value"
    if isinstance(value, dict):
        for key, item in value.items():
            found = _non_finite(item, f"{where}.{key}" if where else str(key))
            if found:
                return found
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _non_finite(item, f"{where}[{i}]")
            if found:
                return found
    return None


def write_json(path: str | Path, payload: dict) -> Path:
    """``payload`` as strict JSON (no NaN, no Infinity), written atomically; an error names a bad key."""
    bad = _non_finite(payload, "")
    if bad is not None:
        raise ValueError(f"refusing to write {path}: {bad} is not a finite number")
    return write_text(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
