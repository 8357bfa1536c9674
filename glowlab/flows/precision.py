"""Mixed precision for flows: coupling networks in autocast's precision, the invertible data path in float32.

Under ``torch.autocast`` every convolution and matrix product runs in bfloat16 (or float16), a
flow's own ones included. Glow's 1x1 convolutions, the LU product that assembles their weights and
so the whole data path would then carry 8 bits of mantissa, while the log-determinant is computed
from the float32 parameters: it would no longer be the log-determinant of the map applied, and the
inverse would no longer undo the forward pass. A coupling layer stays exactly invertible whatever
precision its network computes the shift and scale in, as long as the inverse computes them the
same way. So a model's entry points (decorated with :func:`float32_data_path`) turn autocast off
for the data path and hand the caller's autocast to the coupling networks (:func:`network_precision`),
which do nearly all of a Glow's arithmetic.

The inverse then rebuilds each network's input to float32 rounding, and the network rounds it to
bfloat16: where float32 rounding moves an input across a bfloat16 rounding step (rare), the
network's output, and so the rebuilt image, differs by bfloat16's precision.

References: Micikevicius et al., "Mixed Precision Training", ICLR 2018 (keep what accumulates in float32).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from torch import Tensor

# (device type, dtype, weight cache) of the caller's autocast while a data path runs with it off.
AutocastState = tuple[str, torch.dtype, bool]
Method = TypeVar("Method", bound=Callable)


class _Networks:
    """The autocast state the networks run under; None outside a float32 data path (a plain object:
    dynamo guards on the attribute it reads)."""

    state: AutocastState | None = None


_NETWORKS = _Networks()


def network_state() -> AutocastState | None:
    """The autocast state networks run under now (None: whatever autocast is in force)."""
    return _NETWORKS.state


@contextlib.contextmanager
def networks_under(state: AutocastState | None) -> Iterator[None]:
    """Run the data path with autocast off and networks under ``state`` (None: leave autocast as it is)."""
    if state is None:
        yield
        return
    previous = _NETWORKS.state
    _NETWORKS.state = state
    try:
        with torch.autocast(state[0], enabled=False):
            yield
    finally:
        _NETWORKS.state = previous


def network_precision() -> contextlib.AbstractContextManager:
    """The context a coupling network runs in: the caller's autocast inside a float32 data path."""
    state = _NETWORKS.state
    if state is None:
        return contextlib.nullcontext()
    device, dtype, cache = state
    return torch.autocast(device, dtype=dtype, cache_enabled=cache)


def float32_data_path(method: Method) -> Method:
    """Decorate a model method whose first argument is its input (a tensor or a list of tensors).

    Without autocast the method runs as it is. Under autocast it runs with autocast off, but for
    the networks that enter :func:`network_precision`, which get the caller's autocast back.
    """

    @functools.wraps(method)
    def wrapper(self, inputs: Tensor | Sequence[Tensor], *args, **kwargs):
        device = (inputs if isinstance(inputs, Tensor) else inputs[-1]).device.type
        if not torch.is_autocast_enabled(device):
            return method(self, inputs, *args, **kwargs)
        state = (device, torch.get_autocast_dtype(device), torch.is_autocast_cache_enabled())
        with networks_under(state):
            return method(self, inputs, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


__all__ = ["AutocastState", "float32_data_path", "network_precision", "network_state", "networks_under"]
