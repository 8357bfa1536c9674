"""A training step's forward and backward pass captured once as a CUDA graph and replayed.

An eager training step costs the host a few microseconds per dispatched operator, thousands of
them per step, whatever the batch size; a small model on a fast GPU then waits on the host. A
CUDA graph records the kernels of one forward and backward pass once; each later step copies its
batch into the graph's input tensors and launches the whole pass with one call. The optimizer
step stays outside the graph (a fused or multi-tensor update, a handful of launches), so the
learning-rate schedule, gradient clipping and Lightning's bookkeeping run as they always do.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

# fn(x, y) -> (loss, per-image values): the differentiable part of a training step.
LossFunction = Callable[[Tensor, Tensor | None], tuple[Tensor, dict[str, Tensor]]]
BACKENDS = ("cuda", "emulated")


def first_line(error: BaseException) -> str:
    """The first line of an error's message (a CUDA error's is the cause; the rest is advice), else its type."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class CapturedStep:
    """``loss, values = fn(x, y)`` and ``loss.backward()``, captured for inputs of one shape.

    After :meth:`replay` the parameters' ``.grad`` hold the batch's gradients (never accumulated
    into earlier ones) and the returned loss and values are this batch's. ``fn`` must not
    synchronise with the host (no ``.item()``, no Python branching on tensor values) and must run
    the same kernels for every batch of the captured shape. ``warmup`` eager passes on a side stream
    come first, as CUDA graph capture needs (cuDNN's algorithm search, the allocator's pools,
    compilation and autotuning of compiled flow steps); they change no parameter. They run in the
    capture's own autocast state (its weight cache off): dynamo guards on that state, and a compiled
    step last run in another one would recompile inside the capture, where autotuning cannot run.
    Only the capturing thread is barred from calls that would break a capture
    (``capture_error_mode="thread_local"``): a DataLoader's pin-memory thread keeps allocating
    pinned buffers for the next batches while the step is captured.

    ``backend="emulated"`` runs ``fn`` eagerly at every replay but keeps the graph's bookkeeping
    (static input, output and gradient tensors) and its warm-up: it tests the wiring around a
    capture on a machine without a GPU, and is what the CPU test suite runs.

    References: NVIDIA, "CUDA Graphs" (CUDA C++ Programming Guide); PyTorch, torch.cuda.graphs, 2021.
    """

    def __init__(
        self,
        fn: LossFunction,
        params: Sequence[nn.Parameter],
        x: Tensor,
        y: Tensor | None,
        backend: str = "cuda",
        warmup: int = 2,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
        if backend == "cuda" and x.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs CUDA tensors, got a batch on {x.device}")
        self.fn = fn
        self.params = [p for p in params if p.requires_grad]
        self.backend = backend
        self.static_x = x.detach().clone()
        self.static_y = None if y is None else y.detach().clone()
        device = x.device.type
        self._autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        started = time.perf_counter()
        for p in self.params:
            p.grad = None
        if backend == "cuda":
            self._capture_cuda(warmup)
        else:
            for _ in range(warmup):
                self._warm_up_pass()
            self._run_eagerly_into_static()
        self.capture_seconds = time.perf_counter() - started

    def _context(self) -> torch.autocast:
        """The autocast state of the captured step, with the weight cache off: a cache would keep
        casts made before the capture, and a replay must redo them."""
        device, enabled, dtype = self._autocast
        return torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=False)

    def _backward(self, loss: Tensor) -> None:
        """``loss.backward()`` with autocast off, as a Lightning step runs it (``replay`` is called
        inside the training step's autocast): the float32 data path's backward stays float32."""
        with torch.autocast(self._autocast[0], enabled=False):
            loss.backward()

    def matches(self, x: Tensor, y: Tensor | None) -> bool:
        """Whether a batch fits the captured input tensors (shape, dtype, device, labels or not)."""

        def same(a: Tensor | None, b: Tensor | None) -> bool:
            if a is None or b is None:
                return a is None and b is None
            return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device

        return same(self.static_x, x) and same(self.static_y, y)

    def replay(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """Run the captured pass on this batch; returns copies of its loss and per-image values."""
        with torch.no_grad():
            self.static_x.copy_(x)
            if self.static_y is not None:
                self.static_y.copy_(y)
        if self.backend == "cuda":
            # An eager step in between (a batch of another shape) may have replaced the gradients:
            # the graph writes into its own, so point every parameter back at those.
            for p, g in zip(self.params, self.grads, strict=True):
                if p.grad is not g:
                    p.grad = g
            self.graph.replay()
        else:
            self._run_eagerly_into_static()
        return self.loss.clone(), {k: v.clone() for k, v in self.values.items()}

    def _warm_up_pass(self) -> None:
        with self._context():
            loss, _ = self.fn(self.static_x, self.static_y)
        self._backward(loss)
        for p in self.params:
            p.grad = None

    def _capture_cuda(self, warmup: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._warm_up_pass()
        outer = torch.cuda.current_stream()
        outer.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                with self._context():
                    self.loss, self.values = self.fn(self.static_x, self.static_y)
                self._backward(self.loss)
        except BaseException:
            # A capture that fails to end skips torch.cuda.graph's stream restore: training may go
            # on eagerly (GlowModule does), and must do so on the stream it came from.
            torch.cuda.set_stream(outer)
            raise
        # With no gradient before the capture, backward allocated these in the graph's memory pool;
        # every replay overwrites them.
        self.grads = [p.grad for p in self.params]

    def _run_eagerly_into_static(self) -> None:
        for p in self.params:
            p.grad = None
        with self._context():
            loss, values = self.fn(self.static_x, self.static_y)
        self._backward(loss)
        with torch.no_grad():
            if not hasattr(self, "loss"):  # the first run creates the static outputs, as a capture does
                self.loss = loss.detach().clone()
                self.values = {k: v.detach().clone() for k, v in values.items()}
                self.grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
            self.loss.copy_(loss)
            for k, v in values.items():
                self.values[k].copy_(v)
            for p, g in zip(self.params, self.grads, strict=True):
                if g is not None:
                    g.copy_(p.grad)
                    p.grad = g


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Average the parameters' gradients over the ``torch.distributed`` processes, as DDP does.

    DDP averages gradients from autograd hooks as backward runs, and a replayed graph runs no
    autograd; with DDP's own reduction off, this does it after the step's backward pass (replayed
    or eager): every gradient of a dtype in one buffer, one all-reduce, divided by the number of
    processes. Every process must hold gradients for the same parameters.

    References: Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training", 2020.
    """
    world = torch.distributed.get_world_size()
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numels,), in each gradient's logical order
        torch.distributed.all_reduce(flat)
        flat.div_(world)
        chunks = flat.split([g.numel() for g in grads])
        torch._foreach_copy_(grads, [c.view(g.shape) for c, g in zip(chunks, grads, strict=True)])
