"""Checks of the GPU training path that need a CUDA device; one line per check, exit status 1 on a failure.

The CPU test suite checks the same properties on the CPU (tests/test_fast_path.py: no operator
that would synchronise, one dynamo graph, the captured step's bookkeeping with an emulated
capture). Here they run for real:

1. sync-free: a whole training step (forward, backward, gradient clipping, fused Adam) under
   ``torch.cuda.set_sync_debug_mode("error")``, which raises on any host synchronisation (LU and
   dense 1x1 convolutions);
2. capture: a CUDA-graph replay gives the eager step's loss, per-image values and gradients, batch
   after batch (unconditional, class-conditional, dense 1x1 convolutions whose log-determinant
   takes a batched LU factorisation, invertible backprop, bf16 autocast);
3. compile: ``Glow.compile_steps`` gives the eager log-probabilities and gradients;
4. training: a Lightning run with ``cuda_graphs=True`` ends with the parameters of the eager run,
   its batches coming through a DataLoader with workers and pinned memory as glowlab's data
   module's do (a pin-memory thread allocates while the step is captured);
5. compiled and captured: capture of compiled steps (float32 and bf16), and a Lightning run with
   ``compile=True`` and ``cuda_graphs=True`` against one with ``compile=True`` alone. Last, as the
   slowest to compile.

6. a failed capture: one that reads a value on the host raises, and eager steps go on after it on
   the stream they ran on (what ``GlowModule`` relies on to fall back to eager training);
7. Adamax's skip on the device: training steps with gradient clipping and glowlab's Adamax, the
   skip decided from the gradient norm as the non-finite guard decides it, run under sync debug
   mode "error"; a step on a poisoned batch leaves every parameter and moment bit for bit; the
   steps taken match ``torch.optim.Adamax``'s.

A check that raises (a capture fails on an operator it cannot record) is reported as failed with
the error's first line, and the other checks still run.

8. the log-determinant of the map: on a tiny Glow, the reported log-determinant against autograd's
   Jacobian of what the device computes, in float32 with cuDNN's TF32 on (PyTorch's default) and
   off, and under bf16 autocast (only the coupling networks in bfloat16).
9. capture under DDP: two processes on the one device (gloo, which takes CUDA tensors), the model
   wrapped in ``DistributedDataParallel``; with DDP's reduction off, a replay's gradients averaged
   by ``average_gradients`` against DDP's own averaged gradients of an eager step on the same
   batches (DDP's autograd hooks are registered during the capture, as in a run).

10. model FLOPs and MFU: ``Throughput`` counts the same FLOPs an image in the eager and the
    ``cuda_graphs`` Lightning runs (an eager step's, as the captured run's second batch is), and on
    a GPU in its table logs the run's model FLOPs utilisation.

``--emulate`` runs the same script on the CPU, with a smaller model and the emulated capture
(``CapturedStep(backend="emulated")``: the graph's bookkeeping, no graph) and operators counted
instead of the sync debug mode: a check of the script itself before GPU time is spent on it.

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --emulate   # on the CPU
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable

import lightning as L
import torch
import torch._dynamo
from torch.utils.data import DataLoader, TensorDataset

from glowlab.dispatch import OperatorCounter
from glowlab.flops import device_peak_tflops
from glowlab.models import MultiscaleConfig
from glowlab.training import GlowModule, Throughput
from glowlab.training.capture import CapturedStep, average_gradients, first_line
from glowlab.training.module import configure_clipping, optimizer_with_warmup

SMALL = dict(image_shape=(3, 32, 32), levels=3, steps=4, hidden_channels=64, n_bins=256)
EMULATED = dict(image_shape=(3, 16, 16), levels=2, steps=2, hidden_channels=16, n_bins=256)
DEVICE, BACKEND = "cuda", "cuda"  # --emulate: "cpu", "emulated"
failures: list[str] = []
checks = 0


def report(name: str, ok: bool, detail: str) -> None:
    global checks
    checks += 1
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def max_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to ``b``'s largest value; infinite where either holds NaN or an
    infinity (a NaN would pass through ``max`` and every ``<`` test unnoticed)."""
    value = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    return value if math.isfinite(value) else math.inf


def batch(n: int, classes: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = torch.rand(n, *SMALL["image_shape"], device=DEVICE) - 0.5
    return x, (torch.randint(0, classes, (n,), device=DEVICE) if classes else None)


def module(**options) -> GlowModule:
    """A GlowModule of SMALL on the device; ``options`` go to the config, ``module_options`` to the module."""
    module_options = options.pop("module_options", {})
    glow = GlowModule(MultiscaleConfig(**{**SMALL, **options}), **module_options).to(DEVICE)
    glow.capture_backend = BACKEND
    return glow


def autocast(precision: str) -> torch.autocast:
    return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16")


def synchronisation_free(run: Callable[[], None]) -> tuple[bool, str]:
    """Run ``run``: whether the host never waited for the device, and what shows it.

    On a GPU under ``torch.cuda.set_sync_debug_mode("error")``; with --emulate, the operators that
    would synchronise on a GPU, counted on the CPU.
    """
    if DEVICE == "cpu":
        with OperatorCounter(cpu_is_device=True) as counter:
            run()
        detail = f"{counter.synchronisations} operators of {counter.total} would synchronise on a GPU"
        return counter.synchronisations == 0, detail
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        run()
        return True, "the step ran with sync debug mode 'error'"
    except RuntimeError as error:
        return False, first_line(error)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_sync_free(name: str, **options) -> None:
    torch.manual_seed(0)
    glow = module(**options, module_options=dict(optimizer="adam"))
    optimizer = optimizer_with_warmup(glow, glow.hparams)["optimizer"]
    x, y = batch(16, options.get("num_classes"))
    glow.losses(x, y)[0].backward()  # ActNorm's initialisation reads statistics once, before
    optimizer.step()
    glow.log = lambda *args, **kwargs: None  # no Trainer here; configure_clipping logs the norm

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = glow.losses(x, y)
        loss.backward()
        configure_clipping(glow, 1.0, "norm")
        optimizer.step()

    ok, detail = synchronisation_free(step)
    report(f"sync-free training step ({name})", ok, detail)


def check_capture(name: str, precision: str = "32", compile: bool = False, **options) -> None:
    torch.manual_seed(0)
    classes = options.get("num_classes")
    glow = module(**options)
    x, y = batch(16, classes)
    with autocast(precision):
        glow.losses(x, y)[0].backward()
    if compile:
        torch._dynamo.reset()
        glow.model.compile_steps()
        with autocast(precision):  # compiled in the training step's own autocast state, as a run does
            glow.losses(x, y)[0].backward()
    params = [p for p in glow.parameters() if p.requires_grad]
    with autocast(precision):
        start = time.perf_counter()
        graph = CapturedStep(glow.losses, params, x, y, backend=BACKEND)
        seconds = time.perf_counter() - start
    worst = 0.0
    for _ in range(3):
        x2, y2 = batch(16, classes)
        with autocast(precision):
            loss, values = graph.replay(x2, y2)
        replayed = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        with autocast(precision):
            eager_loss, eager_values = glow.losses(x2, y2)
        eager_loss.backward()
        worst = max(worst, max_relative(loss, eager_loss.detach()), max_relative(values["bpd"], eager_values["bpd"]))
        worst = max(worst, *(max_relative(a, p.grad) for a, p in zip(replayed, params, strict=True)))
    tolerance = 2e-2 if precision == "bf16" else 1e-4
    report(
        f"capture ({name})",
        worst < tolerance,
        f"max relative difference {worst:.2e} over 3 batches, capture {seconds:.2f} s",
    )


def check_compile() -> None:
    torch.manual_seed(0)
    compiled, eager = module(), module()
    x, _ = batch(16, None)
    compiled.model.log_prob(x)
    eager.load_state_dict(compiled.state_dict())
    torch._dynamo.reset()
    start = time.perf_counter()
    compiled.model.compile_steps()
    results = []
    for glow in (eager, compiled):
        log_prob = glow.model.log_prob(x)
        results.append((log_prob, torch.autograd.grad(log_prob.mean(), list(glow.parameters()))))
    seconds = time.perf_counter() - start
    worst = max(
        max_relative(results[1][0], results[0][0]),
        *(max_relative(a, b) for a, b in zip(results[1][1], results[0][1], strict=True)),
    )
    report("compile_steps", worst < 1e-3, f"max relative difference {worst:.2e}; compiled and ran in {seconds:.1f} s")


def train(**options) -> tuple[GlowModule, float]:
    """30 steps of SMALL from a DataLoader with workers and (on a GPU) pinned memory, as glowlab's data module's."""
    L.seed_everything(0)
    glow = module(module_options=dict(lr=1e-3, warmup_steps=5, **options))
    images = torch.rand(16 * 6, *SMALL["image_shape"]) - 0.5
    data = DataLoader(
        TensorDataset(images, torch.zeros(len(images))),
        batch_size=16,
        num_workers=2,
        persistent_workers=True,
        pin_memory=DEVICE == "cuda",
    )
    glow.throughput = Throughput(window=5)  # its FLOPs count and MFU, for check_throughput
    trainer = L.Trainer(
        accelerator="gpu" if DEVICE == "cuda" else "cpu",
        devices=1,
        max_steps=30,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[glow.throughput],
    )
    start = time.perf_counter()
    trainer.fit(glow, train_dataloaders=data)
    return glow, time.perf_counter() - start


def check_training(
    baseline: tuple[GlowModule, float], name: str, runs: list[GlowModule] | None = None, **options
) -> None:
    """A training run with ``options`` ends with the parameters of the ``baseline`` run; the run
    is added to ``runs`` when given."""
    (reference, reference_s), (glow, seconds) = baseline, train(**options)
    if runs is not None:
        runs.append(glow)
    worst = max(max_relative(a, b) for a, b in zip(glow.parameters(), reference.parameters(), strict=True))
    report(
        f"Lightning training with {name}",
        glow._graph is not None and worst < 1e-3,
        f"captured={glow._graph is not None}{f' ({glow._capture_error})' if glow._capture_error else ''}, max "
        f"relative parameter difference after 30 steps {worst:.2e}; fit {reference_s:.1f} s without graphs, "
        f"{seconds:.1f} s with",
    )


def check_throughput(eager: GlowModule, captured: list[GlowModule]) -> None:
    """Throughput's FLOPs an image are the same in an eager and a ``cuda_graphs`` run, and on a GPU
    whose peak glowlab knows the run logs an MFU."""
    if not captured:
        raise RuntimeError("the cuda_graphs run did not finish")
    a, b = eager.throughput, captured[0].throughput
    known = device_peak_tflops(DEVICE, "32-true") is not None
    ok = a.flops_per_image is not None and a.flops_per_image == b.flops_per_image and (b.mfu is not None) == known

    def mflop(counter: Throughput) -> str:
        return "-" if counter.flops_per_image is None else f"{counter.flops_per_image / 1e6:.6g}"

    mfu = "no MFU (no peak known for the device)" if b.mfu is None else f"MFU {b.mfu:.2%} in the captured run"
    report(
        "model FLOPs and MFU",
        ok,
        f"{mflop(a)} MFLOP an image counted in the eager run, {mflop(b)} in the captured one; {mfu}",
    )


def check_failed_capture() -> None:
    """A capture that fails (here on a host read) raises, and eager steps go on as before it."""
    torch.manual_seed(0)
    glow = module()
    x, _ = batch(16, None)
    glow.losses(x, None)[0].backward()  # ActNorm's initialisation
    params = [p for p in glow.parameters() if p.requires_grad]
    passes = 0

    def reads_back(x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nonlocal passes
        passes += 1
        loss, values = glow.losses(x, y)
        if float(loss) != float(loss):  # a host read: barred inside a CUDA capture
            raise ValueError("the loss is NaN")
        if BACKEND == "emulated" and passes == 3:  # nothing is barred without a GPU: fail as a capture would
            raise RuntimeError("emulated: operation not permitted when stream is capturing")
        return loss, values

    stream = torch.cuda.current_stream() if DEVICE == "cuda" else None
    try:
        CapturedStep(reads_back, params, x, None, backend=BACKEND)
        error = None
    except RuntimeError as raised:
        error = first_line(raised)
    for p in params:
        p.grad = None
    loss = glow.losses(x, None)[0]
    loss.backward()
    same_stream = stream is None or torch.cuda.current_stream() == stream
    finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p.grad).all()) for p in params)
    report(
        "failed capture",
        error is not None and same_stream and finite,
        f"raised: {error}; then an eager step on the same stream {same_stream}, finite loss and gradients {finite}",
    )


def check_adamax_skip() -> None:
    torch.manual_seed(0)
    glow = module(module_options=dict(optimizer="adamax", lr=1e-3, warmup_steps=0))
    reference = copy.deepcopy(glow)
    optimizer = optimizer_with_warmup(glow, glow.hparams)["optimizer"]
    optimizer.decide_on_device = True  # on a GPU the default; set for --emulate on the CPU
    theirs = torch.optim.Adamax(reference.parameters(), lr=1e-3, foreach=True)
    glow.log = reference.log = lambda *args, **kwargs: None  # no Trainer; configure_clipping logs
    x, y = batch(16, None)
    poisoned = x.clone()
    poisoned[0] = float("nan")

    def step(model: GlowModule, opt: torch.optim.Optimizer, images: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss, _ = model.losses(images, y)
        loss.backward()
        norm = configure_clipping(model, 50.0, "norm")
        opt.found_inf = (~(torch.isfinite(norm) & torch.isfinite(loss))).to(torch.float32)
        opt.step()

    step(glow, optimizer, x)  # ActNorm's initialisation reads statistics once, before
    step(reference, theirs, x)
    sync_free, detail = synchronisation_free(lambda: step(glow, optimizer, x))
    step(reference, theirs, x)

    def weights_and_moments() -> list[torch.Tensor]:
        return [*glow.parameters(), *(v for state in optimizer.state.values() for v in state.values())]

    before = [t.clone() for t in weights_and_moments()]
    step(glow, optimizer, poisoned)
    after = weights_and_moments()
    unchanged = all(
        torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
        for a, b in zip(before, after, strict=True)
    )
    for _ in range(3):
        step(glow, optimizer, x)
        step(reference, theirs, x)
    worst = max(max_relative(a, b) for a, b in zip(glow.parameters(), reference.parameters(), strict=True))
    report(
        "Adamax skip on the device",
        sync_free and unchanged and worst < 1e-4,
        f"steps without a host synchronisation {sync_free}; the poisoned step left parameters and moments "
        f"bit for bit {unchanged}; after 5 steps taken, parameters against torch's Adamax: {worst:.1e} max "
        f"relative; {detail}",
    )


def check_log_determinant(precision: str, tf32: bool) -> None:
    """The reported log-determinant against autograd's Jacobian of the map the device applies.

    A tiny Glow (128 dimensions) with perturbed weights: under bf16 autocast only its networks run
    in bfloat16 (glowlab.flows.precision); in float32 cuDNN's TF32 (on by default) rounds the data
    path's 1x1 convolutions to 10 bits of mantissa, which this measures with it on and off.
    """
    torch.manual_seed(0)
    glow = MultiscaleConfig(image_shape=(2, 8, 8), levels=3, steps=2, hidden_channels=8)
    model = GlowModule(glow).model.to(DEVICE)
    x = torch.rand(4, 2, 8, 8, device=DEVICE) - 0.5
    model.log_prob(x)  # ActNorm's initialisation (statistics of 4 images: the top level is 1x1)
    x = x[:1]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def latents(v: torch.Tensor) -> torch.Tensor:
        with autocast(precision):
            return torch.cat([z.flatten() for z in model.encode(v)[0]])

    tf32_before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        jacobian = torch.autograd.functional.jacobian(latents, x).reshape(128, 128)
        with autocast(precision):
            logdet = model.encode(x)[1]
    finally:
        torch.backends.cudnn.allow_tf32 = tf32_before
    gap = abs(torch.linalg.slogdet(jacobian.double())[1].item() - logdet.item())
    report(
        f"log-determinant of the map ({precision}, cuDNN TF32 {'on' if tf32 else 'off'})",
        gap < 5e-3,  # the CPU test's bound (tests/test_precision.py): bf16 networks' Jacobian noise
        f"|log|det J| - reported| = {gap:.2e} nats of {abs(logdet.item()):.1f}",
    )


class DDPLoss(torch.nn.Module):
    """The training loss as a module's forward, for DistributedDataParallel to wrap."""

    def __init__(self, glow: GlowModule) -> None:
        super().__init__()
        self.glow = glow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.glow.losses(x, None)[0]


def _ddp_worker(rank: int, world: int, port: int, device: str, backend: str, small: dict, out: str) -> None:
    """One process of :func:`check_ddp_capture`: writes the worst relative difference it saw."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial weights on every process
        glow = GlowModule(MultiscaleConfig(**small)).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(DDPLoss(glow))
        params = [p for p in glow.parameters() if p.requires_grad]
        torch.manual_seed(1 + rank)  # each process its own batches
        batches = [torch.rand(8, *small["image_shape"], device=device) - 0.5 for _ in range(3)]
        ddp(batches[0]).backward()  # ActNorm's initialisation (statistics summed over the processes)
        for p in params:
            p.grad = None
        expected = []
        for x in batches[1:]:  # DDP's own averaged gradients, eagerly
            ddp(x).backward()
            expected.append([p.grad.clone() for p in params])
            for p in params:
                p.grad = None
        ddp.require_backward_grad_sync = False  # as GlowModule does once the step is captured
        graph = CapturedStep(glow.losses, params, batches[0], None, backend=backend)
        worst = 0.0
        for x, reference in zip(batches[1:], expected, strict=True):
            graph.replay(x, None)
            average_gradients(params)
            worst = max(worst, *(max_relative(p.grad, r) for p, r in zip(params, reference, strict=True)))
        with open(os.path.join(out, f"rank{rank}"), "w") as f:
            f.write(repr(worst))
    finally:
        torch.distributed.destroy_process_group()


def check_ddp_capture() -> None:
    with socket.socket() as sock:  # a free port for the processes to meet on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(_ddp_worker, args=(2, port, DEVICE, BACKEND, SMALL, out), nprocs=2)
        worst = max(float(open(os.path.join(out, f"rank{r}")).read()) for r in range(2))
    report(
        "capture under DDP",
        worst < 1e-4,
        f"2 processes: averaged replayed gradients against DDP's, max relative difference {worst:.2e} over 2 batches",
    )


def attempt(label: str, check: Callable[..., None], *args, **kwargs) -> None:
    """Run one check; an exception (a capture that fails raises) is its failure, and the rest still run."""
    try:
        check(*args, **kwargs)
    except Exception as error:
        report(label, False, f"raised {type(error).__name__}: {first_line(error)}")


def main() -> None:
    global DEVICE, BACKEND, SMALL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emulate", action="store_true", help="run on the CPU with the emulated capture")
    args = parser.parse_args()
    if args.emulate:
        DEVICE, BACKEND, SMALL = "cpu", "emulated", EMULATED
        print(f"emulated on the CPU, torch {torch.__version__}", flush=True)
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA device (or --emulate)")
    else:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    lu, conv = "LU, affine, conditional", "1x1 convolution by slogdet, additive"
    attempt(lu, check_sync_free, lu, num_classes=10)
    attempt(conv, check_sync_free, conv, permutation="conv", coupling="additive")
    for name, options in {
        "unconditional": {},
        "conditional": dict(num_classes=10),
        conv: dict(permutation="conv", coupling="additive"),
        "invertible backprop": dict(backprop="invertible"),
        "bf16 autocast": dict(precision="bf16"),
    }.items():
        attempt(f"capture ({name})", check_capture, name, **options)
    attempt("compile_steps", check_compile)
    for precision, tf32 in (("32", True), ("32", False), ("bf16", True)):
        attempt(f"log-determinant ({precision})", check_log_determinant, precision, tf32)
    # The training runs compare parameters after 30 steps, the Adamax check two models' after 5.
    torch.backends.cudnn.deterministic = True
    attempt("Adamax skip on the device", check_adamax_skip)
    eager = train()
    captured: list[GlowModule] = []
    attempt("Lightning training with cuda_graphs", check_training, eager, "cuda_graphs", captured, cuda_graphs=True)
    attempt("model FLOPs and MFU", check_throughput, eager[0], captured)
    attempt("capture (compiled steps)", check_capture, "compiled steps", compile=True)
    attempt("capture (compiled steps, bf16)", check_capture, "compiled steps, bf16", precision="bf16", compile=True)
    torch._dynamo.reset()
    # Against a compiled run without graphs: the same kernels, so a capture's error is not hidden
    # in compilation's rounding (float32 runs drift ~4e-3 apart over 30 steps, measured on the CPU).
    name = "cuda_graphs on compiled steps"
    attempt(
        f"Lightning training with {name}",
        lambda: check_training(train(compile=True), name, compile=True, cuda_graphs=True),
    )
    attempt("capture under DDP", check_ddp_capture)
    attempt("failed capture", check_failed_capture)  # last: it breaks a capture on purpose
    print(f"{len(failures)} of {checks} checks failed" if failures else f"all {checks} checks passed", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
