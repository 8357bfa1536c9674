"""One Glow training step: glowlab against other implementations, alternating in one process.

Configs:
  reference  3x32x32, L=3, K=8, width 128, affine coupling, LU 1x1 convolutions, batch 16, float32
  paper      the Glow paper's CIFAR-10 model: L=3, K=32, width 512, batch 64, bf16 autocast

Implementations (``--impl``, any number):
  glowlab                 eager
  glowlab:compile         flow steps compiled with torch.compile (``model.compile: true``)
  glowlab:graphs          forward and backward captured as one CUDA graph (``model.cuda_graphs: true``)
  glowlab:compile+graphs  both
  PATH.py                 another implementation through an adapter file (benchmarks/adapters/)

Machines drift between processes, so every model lives in this one process and single training
steps (zero_grad, forward, backward, optimizer step) alternate between them; the figures are
medians. Each implementation trains with its own optimizer implementation (glowlab's fused Adam,
torch's default Adam for the adapters), at the same learning rate. Printed per implementation:
images/s and ms per step; memory (CUDA: what the run holds after warm-up plus a step's peak; CPU:
a step's peak RSS above weights, gradients and optimizer state, in a fresh process); model FLOPs
utilisation (FLOPs of forward and backward counted with torch.utils.flop_counter, against the
device's dense peak for the precision); warm-up time (ActNorm initialisation, compilation,
capture); operators dispatched per phase and host synchronisations (eager implementations);
sampling images/s. Then each glowlab variant's speed against the fastest other implementation,
with ``--profile N`` the convolutions' share of each one's operator time over N profiled steps,
and with ``--conv-floor`` the time of each eager implementation's convolutions alone: the
convolution operators of one of its steps (forward and backward), recorded and run again on fresh
tensors of the same shapes, strides and dtypes, against its whole step. With ``--roofline GPU`` (on
CUDA by default, the device itself) each eager step's roofline on that GPU: the least time its
kernels take at the GPU's peak FLOP/s and memory bandwidth (``roofline.py``), the MFU that allows,
and on CUDA the measured step over it.

    pip install -e ".[bench]"
    python benchmarks/glow_step.py                                   # CPU, reference config
    python benchmarks/glow_step.py --device cuda --config paper \\
        --impl glowlab glowlab:graphs glowlab:compile+graphs benchmarks/adapters/normflows_glow.py
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from memory import current_rss_mib, live_memory_env, peak_rss_mib, reset_peak_rss
from roofline import KernelTally, Roofline
from timing import timed
from torch import Tensor, nn

from glowlab.dispatch import OperatorCounter
from glowlab.flops import GPUS, FlopCount, device_peak_tflops, known_gpu
from glowlab.training.capture import first_line

CONFIGS = {
    "reference": dict(image_shape=(3, 32, 32), levels=3, steps=8, hidden_channels=128, batch=16, precision="32"),
    "paper": dict(image_shape=(3, 32, 32), levels=3, steps=32, hidden_channels=512, batch=64, precision="bf16"),
}
GLOWLAB_VARIANTS = ("glowlab", "glowlab:compile", "glowlab:graphs", "glowlab:compile+graphs")


@dataclass
class Implementation:
    """One model with its training step; ``step()`` runs zero_grad, forward, backward and the update."""

    name: str
    model: nn.Module
    loss: Callable[[Tensor], Tensor]
    optimizer: torch.optim.Optimizer
    sample: Callable[[int], Tensor] | None = None
    step: Callable[[], None] = field(init=False)
    warmup_seconds: float = 0.0
    eager: bool = True


def load_adapter(path: str):
    """Import an adapter file: ``build(config)``, ``loss(model, x)``, optional ``optimizer``, ``sample``."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"--impl {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("build", "loss"):
        if not hasattr(module, name):
            raise AttributeError(f"--impl {path}: an adapter needs a function {name}()")
    return module


def build(name: str, config: dict, device: str, lr: float) -> Implementation:
    """The implementation called ``name`` (a glowlab variant or an adapter path), on ``device``."""
    model_config = {k: config[k] for k in ("image_shape", "levels", "steps", "hidden_channels")}
    if name in GLOWLAB_VARIANTS:
        from glowlab.models import MultiscaleConfig
        from glowlab.training import GlowModule
        from glowlab.training.module import optimizer_with_warmup

        flow = MultiscaleConfig(n_bins=256, **model_config)
        module = GlowModule(flow, optimizer="adam", lr=lr, warmup_steps=0).to(device)
        optimizer = optimizer_with_warmup(module, module.hparams)["optimizer"]
        return Implementation(
            name, module, lambda x: module.losses(x, None)[0], optimizer, sample=lambda n: module.model.sample(n)
        )
    if not name.endswith(".py"):
        raise ValueError(f"--impl {name!r} is neither one of {', '.join(GLOWLAB_VARIANTS)} nor an adapter .py file")
    adapter = load_adapter(name)
    model = adapter.build(model_config).to(device)
    optimizer = (
        adapter.optimizer(model, lr) if hasattr(adapter, "optimizer") else torch.optim.Adam(model.parameters(), lr=lr)
    )
    sample = (lambda n: adapter.sample(model, n)) if hasattr(adapter, "sample") else None
    return Implementation(Path(name).stem, model, lambda x: adapter.loss(model, x), optimizer, sample)


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def prepare(impl: Implementation, x: Tensor, device: str, precision: str) -> None:
    """Warm up ``impl`` (ActNorm initialisation, compilation, capture) and set its timed ``step``."""
    params = [p for p in impl.model.parameters() if p.requires_grad]

    def eager_step() -> None:
        impl.optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = impl.loss(x)
        loss.backward()
        impl.optimizer.step()

    impl.step = eager_step
    start = time.perf_counter()
    eager_step()  # data-dependent initialisation
    if impl.name.startswith("glowlab:") and "compile" in impl.name:
        impl.model.model.compile_steps()
        impl.eager = False
    for _ in range(2):
        eager_step()
    if impl.name.endswith("graphs"):
        from glowlab.training.capture import CapturedStep

        with autocast(device, precision):
            graph = CapturedStep(impl.model.losses, params, x, None, backend="cuda")

        def graph_step() -> None:
            graph.replay(x, None)
            impl.optimizer.step()

        impl.step = graph_step
    impl.step()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    impl.warmup_seconds = time.perf_counter() - start


def count_operators(impl: Implementation, x: Tensor, device: str, precision: str) -> dict[str, int]:
    """Operators dispatched by each phase of one eager step, and host synchronisations."""
    counts = {}
    syncs = 0
    # On the CPU, count what would synchronise were the tensors on a GPU.
    as_device = torch.device(device).type == "cpu"
    with OperatorCounter(cpu_is_device=as_device) as counter:
        impl.optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = impl.loss(x)
    counts["forward"], syncs = counter.total, syncs + counter.synchronisations
    with OperatorCounter(cpu_is_device=as_device) as counter:
        loss.backward()
    counts["backward"], syncs = counter.total, syncs + counter.synchronisations
    with OperatorCounter() as counter:
        impl.optimizer.step()
    counts["optimizer"] = counter.total
    counts["syncs"] = syncs
    return counts


def forward_backward(
    impl: Implementation, x: Tensor, device: str, precision: str, mode: contextlib.AbstractContextManager
) -> None:
    """One forward and backward pass of ``impl`` under ``mode`` (a counting or recording mode); no update."""
    impl.optimizer.zero_grad(set_to_none=True)
    with mode:
        with autocast(device, precision):
            loss = impl.loss(x)
        loss.backward()
    impl.optimizer.zero_grad(set_to_none=True)


def count_flops(impl: Implementation, x: Tensor, device: str, precision: str) -> int:
    """FLOPs of one forward and backward pass (matrix products and convolutions)."""
    flops = FlopCount()  # the count training runs log their MFU with
    forward_backward(impl, x, device, precision, flops)
    return flops.total


def convolution_share(impl: Implementation, device: str, steps: int) -> tuple[float, list[tuple[str, float]]]:
    """Where ``steps`` training steps' operator self time goes (CPU, or CUDA kernels on a GPU).

    Returns the convolutions' fraction and the three other operators with the largest fractions.
    """
    from torch.profiler import ProfilerActivity, profile

    on_cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            impl.step()
        if on_cuda:
            torch.cuda.synchronize()
    # Only aten operators: their self times partition the step without counting a call twice.
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    own = (lambda e: e.self_device_time_total) if on_cuda else (lambda e: e.self_cpu_time_total)
    total = sum(own(e) for e in events) or 1.0
    others = sorted((e for e in events if "convolution" not in e.key), key=own, reverse=True)[:3]
    share = sum(own(e) for e in events if "convolution" in e.key) / total
    return share, [(e.key, own(e) / total) for e in others]


class Layout(NamedTuple):
    """A tensor argument's shape, strides and dtype: what a recorded operator needs to run again."""

    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype


def record_convolutions(impl: Implementation, x: Tensor, device: str, precision: str) -> list:
    """The convolution operators (forward and backward) one eager step of ``impl`` dispatches.

    Each as ``(operator, args)`` with every tensor argument replaced by its :class:`Layout`, so
    that :func:`convolutions_alone` can run the same kernels on fresh tensors.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    wanted = (aten.convolution.default, aten.convolution_backward.default)
    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in wanted:
                described = [Layout(a.shape, a.stride(), a.dtype) if isinstance(a, Tensor) else a for a in args]
                calls.append((func, described))
            return func(*args, **(kwargs or {}))

    forward_backward(impl, x, device, precision, Record())
    return calls


def convolutions_alone(calls: list, device: str) -> Callable[[], None]:
    """A function running ``calls`` (from :func:`record_convolutions`) on random tensors of their layouts."""

    def fresh(arg):
        if isinstance(arg, Layout):
            return torch.empty_strided(arg.shape, arg.stride, dtype=arg.dtype, device=device).normal_()
        return arg

    ready = [(func, [fresh(a) for a in args]) for func, args in calls]

    def run() -> None:
        for func, args in ready:
            func(*args)

    return run


def peak_tflops(device: str, precision: str, given: float | None) -> float | None:
    return given if given is not None else device_peak_tflops(device, precision)


class RooflineGPU(NamedTuple):
    """The GPU a roofline is drawn for: its name, dense peak TFLOP/s at the run's precision, TB/s."""

    name: str
    tflops: float
    tb_s: float


def roofline_gpu(args: argparse.Namespace, precision: str) -> RooflineGPU | None:
    """The GPU whose roofline to print, or None for none.

    ``--roofline NAME`` names one (any device runs the step); on CUDA the default is the device
    itself, at the peak its MFU is measured against (``--peak-tflops`` included). ``--roofline-tflops``
    and ``--bandwidth`` override the table, or stand for a GPU it lacks.
    """
    if args.roofline is not None:
        name, own_peak = args.roofline, None
    elif torch.device(args.device).type == "cuda":
        name, own_peak = torch.cuda.get_device_name(torch.device(args.device)), args.peak_tflops
    else:
        return None
    gpu = known_gpu(name)
    listed_peak, listed_bandwidth = (None, None) if gpu is None else (gpu.peak(precision), gpu.tb_s)
    peak = next((v for v in (args.roofline_tflops, own_peak, listed_peak) if v is not None), None)
    bandwidth = args.bandwidth if args.bandwidth is not None else listed_bandwidth
    if peak is None or bandwidth is None:
        if args.roofline is None:
            return None  # the device is a GPU the table lacks: no roofline, as no MFU
        raise SystemExit(
            f"--roofline {name}: not a GPU this script knows ({', '.join(GPUS)}); "
            "give --roofline-tflops and --bandwidth"
        )
    return RooflineGPU(name, peak, bandwidth)


def tally_kernels(impl: Implementation) -> KernelTally:
    """The kernels of one training step of an eager ``impl`` (its ``step``: zero_grad, forward, backward, update)."""
    with KernelTally() as tally:
        impl.step()
    return tally


def cuda_memory(impl_builder: Callable[[], Implementation], x: Tensor, device: str, precision: str):
    """(held MiB after warm-up, step peak MiB above that) of a freshly built implementation on CUDA."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    impl = impl_builder()
    prepare(impl, x, device, precision)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    impl.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - held
    return impl, (held - before) / 2**20, peak / 2**20


def cpu_step_peak(name: str, args: argparse.Namespace) -> float:
    """A step's peak RSS above weights, gradients and optimizer state, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--memory-worker", name, *sys.argv[1:]]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=live_memory_env()).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_worker(name: str, config: dict, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    x = torch.rand(config["batch"], *config["image_shape"]) - 0.5
    impl = build(name, config, "cpu", args.lr)
    prepare(impl, x, "cpu", config["precision"])
    base = current_rss_mib()
    reset_peak_rss()  # the peak of the measured steps only, not of the first ones
    for _ in range(2):
        impl.step()
    print(json.dumps(peak_rss_mib() - base))


def roofline_row(roofline: Roofline, flops: int, peak: float, measured_ms: float) -> dict:
    """A step's roofline for the results: its kernels, bytes, least time and the MFU that allows."""
    ms = 1000 * roofline.seconds
    return {
        "kernels": roofline.kernels,
        "gb_step": roofline.bytes / 1e9,
        "ms": ms,
        "compute_ms": 1000 * roofline.compute_seconds,
        "memory_ms": 1000 * roofline.memory_seconds,
        "mfu_max": flops / roofline.seconds / (peak * 1e12),
        "measured_over_roofline": measured_ms / ms,
        "largest_ms": {name: 1000 * seconds for name, seconds in list(roofline.by_operator.items())[:3]},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", choices=tuple(CONFIGS), default="reference")
    parser.add_argument("--impl", nargs="+", default=["glowlab", "benchmarks/adapters/normflows_glow.py"])
    for key, kind in (("batch", int), ("hidden-channels", int), ("levels", int), ("steps", int)):
        parser.add_argument(f"--{key}", type=kind, help="override the config's value")
    parser.add_argument("--precision", choices=("32", "bf16"), help="override the config's precision")
    parser.add_argument("--pairs", type=int, default=20, help="timed steps per implementation, alternating")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak (default: known GPUs)")
    parser.add_argument(
        "--roofline",
        metavar="GPU",
        help="print each eager step's roofline on this GPU (H200, H100, ...; on CUDA: the device's own)",
    )
    parser.add_argument(
        "--roofline-tflops", type=float, metavar="TFLOP/S", help="the roofline GPU's dense peak (default: known GPUs)"
    )
    parser.add_argument(
        "--bandwidth", type=float, metavar="TB/S", help="the roofline GPU's memory bandwidth (default: known GPUs)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="profile N more steps each: the convolutions' share"
    )
    parser.add_argument(
        "--conv-floor",
        action="store_true",
        help="also time each implementation's convolutions alone (the kernels of one step, replayed)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> dict:
    config = dict(CONFIGS[args.config])
    for key in ("batch", "levels", "steps", "precision"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.hidden_channels is not None:
        config["hidden_channels"] = args.hidden_channels
    return config


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = resolve_config(args)
    if args.memory_worker:
        memory_worker(args.memory_worker, config, args)
        return {}
    device, precision, batch = args.device, config["precision"], config["batch"]
    on_cuda = torch.device(device).type == "cuda"
    for name in args.impl:
        if name.endswith("graphs") and not on_cuda:
            raise SystemExit(f"--impl {name}: CUDA graphs need --device cuda")
    torch.manual_seed(0)
    x = torch.rand(batch, *config["image_shape"], device=device) - 0.5
    impls: dict[str, Implementation] = {}
    memory: dict[str, str] = {}
    for name in args.impl:
        torch.manual_seed(0)
        try:
            if on_cuda and not args.no_memory:
                impl, held, peak = cuda_memory(lambda n=name: build(n, config, device, args.lr), x, device, precision)
                memory[impl.name] = f"{held + peak:7.0f} MiB (held {held:.0f} + step peak {peak:.0f})"
            else:
                impl = build(name, config, device, args.lr)
                prepare(impl, x, device, precision)
                if not args.no_memory:
                    memory[impl.name] = f"step peak RSS {cpu_step_peak(name, args):6.0f} MiB"
        except RuntimeError as error:
            if not name.endswith("graphs"):
                raise
            # A capture that fails (an operator it cannot record) costs its own row, not the run's.
            print(f"--impl {name}: left out, the capture failed ({first_line(error)})", flush=True)
            continue
        impls[impl.name] = impl
    ops = {k: count_operators(v, x, device, precision) for k, v in impls.items() if v.eager and "graphs" not in k}
    flops = {k: count_flops(v, x, device, precision) for k, v in impls.items()}
    gpu = roofline_gpu(args, precision)
    rooflines: dict[str, Roofline] = {}
    if gpu is not None:
        for k, v in impls.items():
            if v.eager and "graphs" not in k:
                rooflines[k] = tally_kernels(v).roofline(gpu.tflops * 1e12, gpu.tb_s * 1e12)
        for k in impls:  # a captured step replays the eager step's kernels
            if k.startswith("glowlab:") and "compile" not in k and "glowlab" in rooflines:
                rooflines[k] = rooflines["glowlab"]
    names = list(impls)
    train_t: dict[str, list[float]] = {k: [] for k in names}
    sample_t: dict[str, list[float]] = {k: [] for k in names if impls[k].sample is not None}
    for i in range(args.pairs):
        order = names[i % len(names) :] + names[: i % len(names)]
        for k in order:
            train_t[k].append(timed(impls[k].step, device))
        for k in order:
            if k in sample_t:
                with torch.no_grad():
                    sample_t[k].append(timed(lambda k=k: impls[k].sample(batch), device))
    conv_share = {k: convolution_share(impls[k], device, args.profile) for k in names} if args.profile else {}
    conv_alone: dict[str, tuple[float, int]] = {}
    if args.conv_floor:
        for k in (k for k in names if impls[k].eager and "graphs" not in k):
            calls = record_convolutions(impls[k], x, device, precision)
            run = convolutions_alone(calls, device)
            run()  # warm-up: oneDNN and cuDNN choose and cache their kernels
            conv_alone[k] = (1000 * statistics.median(timed(run, device) for _ in range(args.pairs)), len(calls))
    peak = peak_tflops(device, precision, args.peak_tflops)
    results = {}
    print(
        f"config {args.config}: {'x'.join(map(str, config['image_shape']))}, L={config['levels']}, "
        f"K={config['steps']}, width {config['hidden_channels']}, batch {batch}, precision {precision}, "
        f"{torch.cuda.get_device_name(torch.device(device)) if on_cuda else device}, torch {torch.__version__}"
    )
    for k in names:
        ms = 1000 * statistics.median(train_t[k])
        row = {
            "params_m": sum(p.numel() for p in impls[k].model.parameters()) / 1e6,
            "img_s": batch / (ms / 1000),
            "ms_step": ms,
            "warmup_s": impls[k].warmup_seconds,
            "gflop_step": flops[k] / 1e9,
            "mfu": None if peak is None else flops[k] / (ms / 1000) / (peak * 1e12),
            "memory": memory.get(k),
            "operators": ops.get(k),
            "sample_img_s": batch / statistics.median(sample_t[k]) if k in sample_t else None,
            "convolution_share": conv_share[k][0] if k in conv_share else None,
            "convolutions_alone_ms": conv_alone[k][0] if k in conv_alone else None,
            "convolution_calls": conv_alone[k][1] if k in conv_alone else None,
            "roofline": roofline_row(rooflines[k], flops[k], gpu.tflops, ms) if k in rooflines else None,
        }
        results[k] = row
        mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.2f}%"
        counted = row["operators"]
        op_text = (
            f"ops fwd {counted['forward']} bwd {counted['backward']} opt {counted['optimizer']} "
            f"(total {sum(v for key, v in counted.items() if key != 'syncs')}), syncs {counted['syncs']}"
            if counted
            else "ops -"
        )
        sampled = "-" if row["sample_img_s"] is None else f"{row['sample_img_s']:.1f}"
        print(
            f"{k:>24}: {row['params_m']:6.2f} M params  train {row['img_s']:8.1f} img/s {ms:8.2f} ms/step  "
            f"MFU {mfu:>7}  warm-up {row['warmup_s']:6.1f} s  sample {sampled} img/s  "
            f"{row['memory'] or ''}  {op_text}"
        )
    others = [k for k in names if not k.startswith("glowlab")]
    if others:
        best = max(others, key=lambda k: results[k]["img_s"])
        for k in names:
            if k.startswith("glowlab"):
                ratios = [b / a for a, b in zip(train_t[k], train_t[best], strict=True)]
                print(
                    f"{k} / {best} (the fastest other): {statistics.median(ratios):.2f}x training img/s "
                    f"(median of {args.pairs} alternating rounds)"
                )
    for k, (share, others) in conv_share.items():
        rest = ", ".join(f"{name} {100 * fraction:.1f}%" for name, fraction in others)
        print(
            f"{k}: convolutions {100 * share:.0f}% of the operators' self time over {args.profile} profiled "
            f"steps; next {rest}"
        )
    for k, (ms, n) in conv_alone.items():
        step = results[k]["ms_step"]
        print(
            f"{k}: its {n} convolution operators alone (forward and backward, replayed on fresh tensors) "
            f"{ms:.1f} ms of its {step:.1f} ms step; the rest {step - ms:.1f} ms"
        )
    if gpu is not None and rooflines:  # none for compiled steps alone
        kind = "bf16" if precision == "bf16" else "TF32"
        print(
            f"roofline on {gpu.name} ({gpu.tflops} TFLOP/s {kind}, {gpu.tb_s} TB/s): each kernel of an eager "
            "step at the longer of its FLOPs at the peak and its bytes at the bandwidth"
        )
        for k, row in ((k, results[k]["roofline"]) for k in names if results[k]["roofline"]):
            measured = f"; this step is {row['measured_over_roofline']:.1f}x that" if on_cuda else ""
            # "aten.threshold_backward.default" -> "threshold_backward"
            largest = ", ".join(f"{name.split('.')[1]} {ms:.2f}" for name, ms in row["largest_ms"].items())
            print(
                f"{k:>24}: {row['kernels']} kernels, {row['gb_step']:.2f} GB moved: at least {row['ms']:.2f} ms "
                f"({row['compute_ms']:.2f} ms in compute-bound kernels, {row['memory_ms']:.2f} ms memory-bound; "
                f"largest {largest} ms), MFU at most {100 * row['mfu_max']:.1f}%{measured}"
            )
    if peak is not None:
        print(f"MFU against {peak} TFLOP/s ({'bf16' if precision == 'bf16' else 'TF32'} dense peak)")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"config": config, "device": device, "results": results}, indent=2, allow_nan=False)
        )
    return results


if __name__ == "__main__":
    main()
