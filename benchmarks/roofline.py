"""The least time a GPU could take for the kernels a piece of code runs, measured on any device.

A step that is not host-bound still has to do its arithmetic and move its bytes. Run eagerly, every
operator that launches a kernel reads its tensor inputs from memory and writes its outputs; a kernel
takes at least the longer of its FLOPs at the GPU's peak rate and its bytes at the GPU's memory
bandwidth. Their sum over a step is that step's roofline on that GPU: capture and launch tuning
take host time away, not this; fusing kernels (``torch.compile``) or doing less work lowers it.
:class:`KernelTally` records each kernel's FLOPs (matrix products and convolutions, with
``torch.utils.flop_counter``'s formulas) and bytes on whatever device runs the code, so a CPU run
predicts what a GPU step can reach, and how far a measured step is from it.

The bytes are what an unfused kernel moves at the least: each distinct tensor it reads once and each
output it writes once, returned or written in place as its schema says (a view counts the elements
it spans, a broadcast tensor its storage). Kernels that read an input more than once from memory
move more; a GPU's L2 cache, holding a tensor from one kernel to the next, can spare some traffic,
so a step of small tensors can come in under its roofline.

References: Williams, Waterman & Patterson, "Roofline: an insightful visual performance model for
multicore architectures", 2009.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

# Operators that allocate, alias or describe memory without running a kernel (views are found by
# their schema).
NO_KERNEL = frozenset(
    {
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "detach",
        "alias",
        "_unsafe_view",
        "_reshape_alias",
        "resize_",
        "lift_fresh",
        "set_",
    }
)
# Operators that write their first argument without reading it.
WRITE_ONLY_FIRST = frozenset({"copy_", "fill_", "zero_", "_foreach_zero_"})


def launches_kernel(func: Any) -> bool:
    """Whether the ATen operator ``func`` runs a kernel (not a view, allocation or alias)."""
    return not (func.is_view or func.overloadpacket.__name__ in NO_KERNEL)


def tensor_bytes(t: Tensor) -> int:
    """Bytes of memory ``t`` spans: its elements, or less where strides repeat them (a broadcast)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    return min(t.numel(), span) * t.element_size()


def _distinct(tensors: list[Tensor]) -> list[Tensor]:
    seen: set[tuple] = set()
    unique = []
    for t in tensors:
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            unique.append(t)
    return unique


def written_arguments(func: Any, args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors ``func``'s schema marks as written in place (``Tensor(a!)``), lists included."""
    written = []
    for i, argument in enumerate(func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(argument.name)
            written += [t for t in tree_leaves(value) if isinstance(t, Tensor)]
    return written


def moved_bytes(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """Bytes an unfused kernel for ``func`` reads (each distinct input once) and writes (each output once).

    The outputs are the tensors it returns and those it writes in place (an in-place update that
    returns nothing, such as a fused optimizer's, reads and writes its tensors).
    """
    inputs = [a for a in tree_leaves((args, kwargs)) if isinstance(a, Tensor)]
    if func.overloadpacket.__name__ in WRITE_ONLY_FIRST and args:
        written = {id(t) for t in tree_leaves(args[0]) if isinstance(t, Tensor)}
        inputs = [t for t in inputs if id(t) not in written]
    outputs = [o for o in tree_leaves(out) if isinstance(o, Tensor)] + written_arguments(func, args, kwargs)
    return sum(map(tensor_bytes, _distinct(inputs))) + sum(map(tensor_bytes, _distinct(outputs)))


@dataclass(frozen=True)
class Kernel:
    """One kernel-launching operator: its name, FLOPs and bytes moved."""

    name: str
    flops: int
    bytes: int


@dataclass(frozen=True)
class Roofline:
    """The least time a set of kernels takes on a GPU of ``peak_flops`` FLOP/s and ``bandwidth`` B/s."""

    kernels: int
    flops: int
    bytes: int
    seconds: float
    compute_seconds: float  # the part of ``seconds`` in kernels limited by arithmetic
    memory_seconds: float  # the part in kernels limited by memory traffic
    by_operator: dict[str, float]  # seconds per operator name, largest first


class KernelTally(TorchDispatchMode):
    """Records the kernels dispatched inside a ``with`` block (see :class:`Kernel`), in order.

    References: Williams, Waterman & Patterson, "Roofline: an insightful visual performance model
    for multicore architectures", 2009.
    """

    def __init__(self) -> None:
        super().__init__()
        self.kernels: list[Kernel] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if launches_kernel(func):
            formula = flop_registry.get(func.overloadpacket)
            flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
            self.kernels.append(Kernel(str(func), flops, moved_bytes(func, args, kwargs, out)))
        return out

    def roofline(self, peak_flops: float, bandwidth: float) -> Roofline:
        """The recorded kernels' roofline at ``peak_flops`` FLOP/s and ``bandwidth`` bytes/s."""
        compute = memory = 0.0
        by_operator: dict[str, float] = {}
        for k in self.kernels:
            t_compute, t_memory = k.flops / peak_flops, k.bytes / bandwidth
            if t_compute >= t_memory:
                compute += t_compute
            else:
                memory += t_memory
            by_operator[k.name] = by_operator.get(k.name, 0.0) + max(t_compute, t_memory)
        return Roofline(
            kernels=len(self.kernels),
            flops=sum(k.flops for k in self.kernels),
            bytes=sum(k.bytes for k in self.kernels),
            seconds=compute + memory,
            compute_seconds=compute,
            memory_seconds=memory,
            by_operator=dict(sorted(by_operator.items(), key=lambda item: item[1], reverse=True)),
        )
