"""What a piece of code asks of the device: operators dispatched and host synchronisations.

On a GPU a training step that is not host-bound launches its work and moves on; two things stop
that. Every dispatched operator costs host time (a few microseconds of Python and dispatcher work,
whatever the tensor size), and every host synchronisation (``.item()``, ``bool(tensor)``, a copy to
the CPU, an operator whose output size depends on values) makes the host wait for the device.
:class:`OperatorCounter` counts both on any device, so a CPU run predicts what a GPU step pays.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators that read tensor values on the host (or size their output by them): on a GPU each one
# waits for every kernel queued before it.
SYNCHRONISING_OPERATORS = frozenset(
    {
        "aten._local_scalar_dense.default",
        "aten.is_nonzero.default",
        "aten.item.default",
        "aten.equal.default",
        "aten.nonzero.default",
        "aten.masked_select.default",
        "aten._unique2.default",
        "aten.unique_consecutive.default",
        "aten.unique_dim.default",
    }
)


class OperatorCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside a ``with`` block, by name.

    ``counts`` maps operator names (``"aten.mul.Tensor"``) to calls; :attr:`total` is their sum and
    :attr:`synchronisations` the calls that would make the host wait for a GPU: the operators in
    :data:`SYNCHRONISING_OPERATORS` on tensors not on the CPU host, and copies from a device to the
    host. Counting from the CPU, pass ``cpu_is_device=True`` to count the operators that would
    synchronise had the tensors been on a GPU.

    References: PyTorch, "__torch_dispatch__" (torch.utils._python_dispatch), 2022.
    """

    def __init__(self, cpu_is_device: bool = False) -> None:
        super().__init__()
        self.cpu_is_device = cpu_is_device
        self.counts: Counter[str] = Counter()
        self.synchronising: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = str(func)
        self.counts[name] += 1
        if self._synchronises(name, args, kwargs):
            self.synchronising[name] += 1
        return func(*args, **kwargs)

    def _synchronises(self, name: str, args: tuple, kwargs: dict) -> bool:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        on_device = first is not None and (first.device.type != "cpu" or self.cpu_is_device)
        if name in SYNCHRONISING_OPERATORS:
            return on_device
        if name in ("aten._to_copy.default", "aten.copy_.default") and first is not None:
            # A device tensor copied to the host: the host has to wait for it.
            target = kwargs.get("device")
            if name == "aten.copy_.default":
                source = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
                return source is not None and source.device.type != "cpu" and first.device.type == "cpu"
            return first.device.type != "cpu" and target is not None and torch.device(target).type == "cpu"
        return False

    @property
    def total(self) -> int:
        """Operators dispatched."""
        return sum(self.counts.values())

    @property
    def synchronisations(self) -> int:
        """Operators that make the host wait for the device."""
        return sum(self.synchronising.values())
