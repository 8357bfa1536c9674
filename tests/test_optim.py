"""glowlab.optim.Adamax: torch's Adamax update, and a flagged step that changes nothing.

Both ways of applying the flag run here on the CPU: decided on the device (as on a GPU, where no
value may be read back) and read on the host (the CPU's default, torch's own update).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from glowlab.dispatch import OperatorCounter
from glowlab.optim import Adamax


def make_params(dtype: torch.dtype = torch.float64) -> list[nn.Parameter]:
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in ((3, 4), (5,), (2, 3, 3, 3), ())]


def set_grads(params: list[nn.Parameter], seed: int, poison: float | None = None) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
    if poison is not None:
        params[1].grad[2] = poison


def snapshot(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> list[Tensor]:
    state = [t for p in params for t in optimizer.state.get(p, {}).values()]
    return [t.detach().clone() for t in (*params, *state)]


BOTH_WAYS = pytest.mark.parametrize("on_device", [True, False], ids=["on-device", "on-host"])


def assert_bitwise_equal(before: list[Tensor], after: list[Tensor]) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


@BOTH_WAYS
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_the_update_is_torch_adamax(weight_decay: float, on_device: bool) -> None:
    ours, theirs, flagged = make_params(), make_params(), make_params()
    optimizer = Adamax(ours, lr=0.01, weight_decay=weight_decay, decide_on_device=on_device)
    reference = torch.optim.Adamax(theirs, lr=0.01, weight_decay=weight_decay, foreach=True)
    with_flag = Adamax(flagged, lr=0.01, weight_decay=weight_decay, decide_on_device=on_device)
    for step in range(12):
        for params in (ours, theirs, flagged):
            set_grads(params, step)
        optimizer.step()
        reference.step()
        with_flag.found_inf = torch.zeros(())  # a step the guard lets through
        with_flag.step()
    for p, q, r in zip(ours, theirs, flagged, strict=True):
        assert float(optimizer.state[p]["step"]) == float(reference.state[q]["step"]) == 12
        ours_now = [p, optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_inf"]]
        theirs_now = [q, reference.state[q]["exp_avg"], reference.state[q]["exp_inf"]]
        if on_device:  # the same update to float rounding
            for a, b in zip(ours_now, theirs_now, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        else:  # torch's own
            assert_bitwise_equal(theirs_now, ours_now)
        assert_bitwise_equal([p], [r])


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf"), 1.0])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@BOTH_WAYS
def test_a_flagged_step_changes_nothing_bit_for_bit(
    poison: float, weight_decay: float, dtype: torch.dtype, on_device: bool
) -> None:
    params = make_params(dtype)
    optimizer = Adamax(params, lr=0.01, weight_decay=weight_decay, decide_on_device=on_device)
    optimizer.found_inf = torch.ones(())
    set_grads(params, 0, poison)
    before = [p.detach().clone() for p in params]
    optimizer.step()  # the very first step skipped: no moment yet, a zero step count
    assert_bitwise_equal(before, [p.detach() for p in params])
    assert all(float(optimizer.state[p]["step"]) == 0 for p in params)
    for step in range(1, 4):
        optimizer.found_inf = torch.zeros(())
        set_grads(params, step)
        optimizer.step()
    with torch.no_grad():  # zeros of either sign, with a moment of either sign or a zero one
        params[0][0, :3] = torch.tensor([-0.0, 0.0, 0.25])
        optimizer.state[params[0]]["exp_avg"][0, :3] = torch.tensor([-0.5, -0.5, -0.0])
    optimizer.found_inf = torch.tensor(1.0)
    set_grads(params, 9, poison)
    before = snapshot(params, optimizer)
    optimizer.step()
    assert_bitwise_equal(before, snapshot(params, optimizer))
    assert all(float(optimizer.state[p]["step"]) == 3 for p in params)


@BOTH_WAYS
def test_skipped_steps_leave_the_run_of_taken_steps(on_device: bool) -> None:
    """Steps 0, 1, 3 taken and 2 skipped: the same as a torch Adamax that saw steps 0, 1, 3 only."""
    ours, theirs = make_params(), make_params()
    optimizer = Adamax(ours, lr=0.01, decide_on_device=on_device)
    reference = torch.optim.Adamax(theirs, lr=0.01, foreach=False)
    for step in range(4):
        set_grads(ours, step, float("nan") if step == 2 else None)
        optimizer.found_inf = torch.tensor(float(step == 2))
        optimizer.step()
        if step != 2:
            set_grads(theirs, step)
            reference.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_decided_on_the_device_the_update_reads_nothing_on_the_host() -> None:
    params = make_params(torch.float32)
    optimizer = Adamax(params, lr=0.01, weight_decay=0.01, decide_on_device=True)
    for flag in (0.0, 1.0):
        set_grads(params, 0, float("nan") if flag else None)
        optimizer.found_inf = torch.tensor(flag)
        with OperatorCounter(cpu_is_device=True) as counter:
            optimizer.step()
        assert counter.synchronisations == 0, counter.synchronising


@BOTH_WAYS
def test_a_torch_adamax_state_dict_loads_and_continues(on_device: bool) -> None:
    ours, theirs = make_params(), make_params()
    reference = torch.optim.Adamax(theirs, lr=0.01, foreach=True)
    for step in range(3):
        set_grads(theirs, step)
        reference.step()
    with torch.no_grad():
        for a, b in zip(ours, theirs, strict=True):
            a.copy_(b)
    optimizer = Adamax(ours, lr=0.01, decide_on_device=on_device)
    optimizer.load_state_dict(copy.deepcopy(reference.state_dict()))  # as from a checkpoint
    assert optimizer.param_groups[0]["capturable"] and optimizer.param_groups[0]["foreach"]
    for step in range(3, 5):
        set_grads(ours, step)
        set_grads(theirs, step)
        optimizer.found_inf = torch.zeros(())
        optimizer.step()
        reference.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert all(float(optimizer.state[p]["step"]) == 5 for p in ours)


def test_found_inf_must_be_one_value_on_the_parameters_device() -> None:
    params = make_params(torch.float32)
    optimizer = Adamax(params)
    set_grads(params, 0)
    optimizer.found_inf = torch.zeros(2)
    with pytest.raises(ValueError, match=r"found_inf must be a 0-dim tensor on cpu, got shape \(2,\)"):
        optimizer.step()


def test_off_the_cpu_the_flag_is_applied_on_the_device_by_default() -> None:
    # On the meta device any read of a value on the host raises, as a GPU would have to wait for it.
    params = [nn.Parameter(torch.empty(shape, device="meta")) for shape in ((3, 4), (5,))]
    for p in params:
        p.grad = torch.empty(p.shape, device="meta")
    optimizer = Adamax(params, weight_decay=0.01)
    for flag in (0.0, 1.0):
        optimizer.found_inf = torch.tensor(flag, device="meta")
        optimizer.step()
    assert optimizer.state[params[0]]["step"].device.type == "meta"
    optimizer.decide_on_device = False  # read on the host: refused here
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):
        optimizer.step()
