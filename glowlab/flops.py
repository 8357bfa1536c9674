"""Model FLOPs utilisation: a training step's FLOPs against the dense peak of the GPU that runs it.

The FLOPs are those ``torch.utils.flop_counter``'s formulas give the matrix products and
convolutions of one eager forward and backward pass (:class:`StepFlops`); the peaks are NVIDIA's
data-sheet figures for dense (not sparse) tensor-core arithmetic (:data:`GPUS`). MFU is achieved
FLOP/s over that peak, a figure that compares runs across models, batch sizes and machines.

References: Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", 2022 (appendix B).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class GPU(NamedTuple):
    """A GPU's dense peak TFLOP/s (bf16, the same for fp16; TF32, which cuDNN uses for float32
    convolutions by default) and memory bandwidth in TB/s, from NVIDIA's data sheets."""

    bf16: float
    tf32: float
    tb_s: float

    def peak(self, precision: str) -> float:
        """Dense peak TFLOP/s for a precision kind ("bf16", "16", or "32" for TF32)."""
        return self.tf32 if precision == "32" else self.bf16


# The first key a device's name contains wins (case aside), so the PCIe and NVL parts (lower clocks
# and power) come before the SXM parts' plain names, and the 80 GB A100s (faster memory) before the
# 40 GB ones.
GPUS = {
    "H200 NVL": GPU(835.5, 417.5, 4.8),
    "H200": GPU(989.4, 494.7, 4.8),
    "H100 PCIe": GPU(756.5, 378.0, 2.0),
    "H100 NVL": GPU(835.5, 417.5, 3.9),
    "H100": GPU(989.4, 494.7, 3.35),
    "A100 80GB PCIe": GPU(312.0, 156.0, 1.935),
    "A100-SXM4-80GB": GPU(312.0, 156.0, 2.039),
    "A100": GPU(312.0, 156.0, 1.555),
}


def known_gpu(name: str) -> GPU | None:
    """The :data:`GPUS` entry for a device name (``"NVIDIA H200"``, ``"H100 PCIe"``), or None."""
    return next((gpu for key, gpu in GPUS.items() if key.lower() in name.lower()), None)


def precision_kind(precision: str) -> str | None:
    """The kind of arithmetic, "bf16", "16" or "32", of a Lightning precision ("bf16-mixed",
    "16-mixed", "32-true") or a benchmark's ("bf16", "32"); None for one without a listed peak (float64)."""
    kind = str(precision).split("-")[0]
    return kind if kind in ("bf16", "16", "32") else None


def device_peak_tflops(device: torch.device | str, precision: str) -> float | None:
    """The dense peak TFLOP/s of ``device`` at ``precision``, or None where it is not known.

    Known: the CUDA GPUs of :data:`GPUS`. Float32 counts at the TF32 peak while cuDNN may use TF32
    for convolutions (``torch.backends.cudnn.allow_tf32``, on by default), else it has no listed peak.
    """
    device = torch.device(device)
    kind = precision_kind(precision)
    if device.type != "cuda" or kind is None or (kind == "32" and not torch.backends.cudnn.allow_tf32):
        return None
    gpu = known_gpu(torch.cuda.get_device_name(device))
    return None if gpu is None else gpu.peak(kind)


class FlopCount(TorchDispatchMode):
    """Adds up the FLOPs of the operators dispatched inside it, by ``torch.utils.flop_counter``'s formulas.

    ``FlopCounterMode`` counts the same, and also tracks modules with hooks on autograd's graph,
    which fail under a ``torch.autograd.grad`` call inside a backward pass (invertible backprop's);
    this mode keeps the total alone. An operator without a formula is decomposed, where it can be,
    so that its matrix products count, as ``FlopCounterMode`` does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        formula = flop_registry.get(func.overloadpacket)
        if formula is None and func is not torch.ops.prim.device.default:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


class StepFlops:
    """Counts the FLOPs of the code run between :meth:`start` and :meth:`stop` (a training step's
    forward and backward pass, which may begin and end in different hooks of a training loop).

    Operators dispatched meanwhile pass through a ``TorchDispatchMode``, so functions compiled with
    ``torch.compile`` run eagerly while counted (dynamo steps aside under a dispatch mode), and a
    replayed CUDA graph dispatches nothing: count an eager step. Work that backward redoes, as
    invertible backprop's recomputed activations, is counted as it runs.
    """

    def __init__(self) -> None:
        self._mode: FlopCount | None = None
        self.total: int | None = None

    @property
    def counting(self) -> bool:
        return self._mode is not None

    def start(self) -> None:
        if self._mode is None:
            self._mode = FlopCount()
            self._mode.__enter__()

    def stop(self) -> int:
        """Stop counting; returns (and keeps in :attr:`total`) the FLOPs counted since :meth:`start`."""
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
            self.total = mode.total
        return self.total or 0
