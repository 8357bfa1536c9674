"""Adamax whose step can be skipped on the device, so a guarded training step never waits for the GPU.

glowlab skips an optimizer step whose loss or gradient norm is not finite. Fused Adam takes the
skip decision as a device tensor (``found_inf``); torch's Adamax has no such input, so deciding
meant reading the decision on the host: one synchronisation per step, which makes the host wait
for the whole forward and backward pass before it can queue anything more. :class:`Adamax` takes
``found_inf`` as fused Adam does and applies it inside its multi-tensor update, as factors that
are exactly the identity on a skipped step; nothing is read back.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamax import adamax

# A float tensor's bits as integers of the same width: how a non-finite gradient is zeroed by a
# multiplication (NaN or infinity times zero is NaN in floating point; its bits times zero are 0).
_SAME_WIDTH_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


class Adamax(torch.optim.Adamax):
    """torch's multi-tensor Adamax, plus ``found_inf``: a step it flags changes nothing, decided on the device.

    Set ``optimizer.found_inf`` (a 0-dim tensor on the parameters' device, nonzero to skip) before
    :meth:`step`, as for fused Adam; without it every step is taken. A skipped step leaves every
    parameter, moment and step count bit for bit as it was, whatever the gradients hold (NaN,
    infinities).

    Where the parameters are (``decide_on_device``, default: off the CPU) the decision is applied
    on the device and no value is read on the host: the gradients' bits are multiplied by 0 or 1
    (a skipped step's gradients become zeros), and each of the update's coefficients is chosen
    between its own value and the identity's by a 0-dim ``where``. That update is Adamax's to float
    rounding (the first moment is formed as ``m * beta1 + g * (1 - beta1)`` rather than by
    ``lerp``). On the CPU, where reading the flag costs nothing, the flag is read and the update is
    ``torch.optim.Adamax``'s multi-tensor one, bit for bit.

    The state has Adamax's names and shapes, with the step counts on the parameters' device (as
    torch's ``capturable`` Adamax keeps them; float64 for float64 parameters), and a
    ``torch.optim.Adamax`` state dict loads into it. Options beyond these (``maximize``,
    ``differentiable``) are not offered.

    References: Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2015 (Adamax, Algorithm 2).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decide_on_device: bool | None = None,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=True, capturable=True)
        self.decide_on_device = decide_on_device
        self.found_inf: Tensor | None = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of ``torch.optim.Adamax`` (whose step counts may be on the CPU)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.update(foreach=True, capturable=True, maximize=False, differentiable=False)
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    state["step"] = state["step"].to(device=p.device, dtype=_step_dtype(p))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One Adamax update of every parameter with a gradient; none at all if ``found_inf`` is nonzero."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            tensors: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = defaultdict(
                lambda: [[], [], [], [], []]
            )
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adamax does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=_step_dtype(p), device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                lists = tensors[(p.device, p.dtype)]
                for i, t in enumerate((p, p.grad, state["exp_avg"], state["exp_inf"], state["step"])):
                    lists[i].append(t)
            for (device, dtype), lists in tensors.items():
                skip = self._skip(device)
                on_device = self.decide_on_device if self.decide_on_device is not None else device.type != "cpu"
                if on_device:
                    _update_on_device(*lists, skip, dtype, group)
                elif skip is None or not bool(skip):  # a host read, free on the CPU
                    _update(*lists, group)
        return loss

    def _skip(self, device: torch.device) -> Tensor | None:
        found_inf = self.found_inf
        if found_inf is None:
            return None
        if found_inf.dim() != 0 or found_inf.device != device:
            raise ValueError(
                f"found_inf must be a 0-dim tensor on {device}, "
                f"got shape {tuple(found_inf.shape)} on {found_inf.device}"
            )
        return found_inf != 0


def _step_dtype(param: Tensor) -> torch.dtype:
    # Step counts in float32 (exact to 2^24 steps), float64 for float64 parameters: the bias
    # correction is computed from them in their precision.
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    steps: list[Tensor],
    group: dict[str, Any],
) -> None:
    """torch's own multi-tensor Adamax update (its step counts read on the host)."""
    beta1, beta2 = group["betas"]
    adamax(
        params,
        grads,
        exp_avgs,
        exp_infs,
        steps,
        foreach=True,
        capturable=False,
        eps=group["eps"],
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
    )


def _update_on_device(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    steps: list[Tensor],
    skip: Tensor | None,
    dtype: torch.dtype,
    group: dict[str, Any],
) -> None:
    """Adamax's update of one device's tensors of one dtype; with ``skip`` true, the identity, bit for bit."""
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    device = params[0].device

    def chosen(taken: float, skipped: float) -> Tensor | float:
        # The coefficient of a taken step, or the identity's when the step is skipped (0-dim, on the device).
        if skip is None:
            return taken
        # torch.full fills on the device; a torch.tensor(...) would be a copy from the host.
        return torch.where(skip, torch.full((), skipped, dtype=dtype, device=device), taken)

    # Every coefficient is a host number or a 0-dim tensor of the lists' own dtype on their device:
    # the multi-tensor kernels then read it on the device. (A tensor added to a list, ``_foreach_add_``
    # with a 0-dim tensor, is read on the host on a CPU, so steps are counted by adding a list.)
    if skip is not None:
        bits = _SAME_WIDTH_INT[dtype]
        torch._foreach_mul_([g.view(bits) for g in grads], (~skip).to(bits))  # skipped: all zeros
        torch._foreach_add_(steps, [(~skip).to(steps[0].dtype)] * len(steps))
    else:
        torch._foreach_add_(steps, 1.0)
    if weight_decay != 0:
        grads = torch._foreach_add(grads, torch._foreach_mul(params, chosen(weight_decay, 0.0)))
    # m <- m * beta1 + g * (1 - beta1); skipped: m * 1 + (+0) * (-0), and m + (-0) is m bit for bit,
    # a moment of -0 included (-0 is the one exact additive identity; the gradient is +0 here).
    scaled = torch._foreach_mul(grads, chosen(1.0 - beta1, -0.0))
    torch._foreach_mul_(exp_avgs, chosen(beta1, 1.0))
    torch._foreach_add_(exp_avgs, scaled)
    # u <- max(u * beta2, |g| + eps); skipped: max(u * 1, (0 + eps) * 0) = u, since u >= 0.
    torch._foreach_mul_(exp_infs, chosen(beta2, 1.0))
    bound = torch._foreach_abs(grads)
    torch._foreach_add_(bound, eps)
    if skip is not None:
        torch._foreach_mul_(bound, chosen(1.0, 0.0))
    torch._foreach_maximum_(exp_infs, bound)
    # p <- p - lr / (1 - beta1^t) * m / u, written p + m / (u * (beta1^t - 1) / lr) as torch's
    # capturable Adamax does.
    corrections = torch._foreach_pow(beta1, steps)
    torch._foreach_sub_(corrections, 1.0)
    torch._foreach_div_(corrections, lr)
    denominators = torch._foreach_mul(exp_infs, corrections)
    numerators = exp_avgs
    if skip is not None:
        # Skipped: p + (+0) / (negative) = p + (-0), which is p bit for bit. The numerator is +0
        # (m * 0 + 0, whatever m's sign); the denominator is
        # kept below zero (it is 0 before the first step taken, u = 0), which changes no step
        # taken: there u >= eps and the denominator is far from the bound.
        numerators = torch._foreach_mul(exp_avgs, chosen(1.0, 0.0))
        torch._foreach_add_(numerators, 0.0)
        torch._foreach_clamp_max_(denominators, -_least_magnitude(dtype))
    torch._foreach_addcdiv_(params, numerators, denominators)


@functools.cache
def _least_magnitude(dtype: torch.dtype) -> float:
    """A positive number below any step's denominator in ``dtype`` that no kernel flushes to zero.

    The smallest normal number; for float16 (computed in float32 by the kernels) its smallest
    subnormal, 2^-24, since its smallest normal (6e-5) is not negligible.
    """
    return 2.0**-24 if dtype == torch.float16 else torch.finfo(dtype).tiny
