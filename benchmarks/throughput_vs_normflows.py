"""Training and sampling throughput of glowlab's Glow against normflows' on the same config.

Reference config: image 3x32x32, L=3, K=8, hidden width 128, affine coupling, LU 1x1 conv, batch
16, float32. normflows (the PyPI package) builds it from ``GlowBlock`` and ``MultiscaleFlow`` as in
its Glow example. Machines drift by +-20% between processes, so both models live in one process
and single training steps (forward, backward, Adam step) alternate between them; the script
prints medians and the median of the per-pair time ratios. Sampling alternates the same way.
Peak memory (what a training step needs above parameters, gradients and Adam state) is measured
per model in a fresh process: peak RSS on a CPU, ``torch.cuda.max_memory_allocated`` on a GPU.
``--compile`` runs glowlab's encoding pass through ``torch.compile``, as ``model.compile: true``
does in training.

    pip install normflows
    python benchmarks/throughput_vs_normflows.py               # CPU
    python benchmarks/throughput_vs_normflows.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch
from memory import current_rss_mib, live_memory_env, peak_rss_mib, reset_peak_rss
from timing import timed

SHAPE, LEVELS, STEPS, WIDTH = (3, 32, 32), 3, 8, 128


def glowlab_model(width: int, memory_format: str = "channels_last") -> torch.nn.Module:
    from glowlab.models import Glow

    return Glow(
        image_shape=SHAPE,
        levels=LEVELS,
        steps=STEPS,
        hidden_channels=width,
        coupling="affine",
        permutation="lu",
        memory_format=memory_format,
    )


def normflows_model(width: int) -> torch.nn.Module:
    """normflows' multiscale Glow, built as in its Glow example (unconditional base)."""
    import normflows as nf

    channels = SHAPE[0]
    q0, merges, flows = [], [], []
    for i in range(LEVELS):
        level = [
            nf.flows.GlowBlock(channels * 2 ** (LEVELS + 1 - i), width, split_mode="channel", scale=True)
            for _ in range(STEPS)
        ]
        level += [nf.flows.Squeeze()]
        flows += [level]
        if i > 0:
            merges += [nf.flows.Merge()]
            latent = (channels * 2 ** (LEVELS - i), SHAPE[1] // 2 ** (LEVELS - i), SHAPE[2] // 2 ** (LEVELS - i))
        else:
            latent = (channels * 2 ** (LEVELS + 1), SHAPE[1] // 2**LEVELS, SHAPE[2] // 2**LEVELS)
        q0 += [nf.distributions.GlowBase(latent)]
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def loss_function(kind: str, model: torch.nn.Module, compile_model: bool = False):
    """The training loss of one batch: glowlab's NLL (its encoding pass compiled if asked), normflows' KL."""
    if kind == "glowlab":
        # GlowModule compiles the same bound method, so the parameters stay those of the plain model.
        evaluate = torch.compile(model.evaluate) if compile_model else model.evaluate
        return lambda x: -evaluate(x).log_prob.mean()
    return lambda x: model.forward_kld(x + 0.5)


def trainer(kind: str, model: torch.nn.Module, x: torch.Tensor, compile_model: bool = False):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = loss_function(kind, model, compile_model)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x)
        loss.backward()
        optimizer.step()

    return step


def sampler(model: torch.nn.Module, n: int):
    def draw() -> None:
        with torch.no_grad():
            model.sample(n)  # both libraries call it sample(n): n images at temperature 1

    return draw


def peak_memory(kind: str, width: int, batch: int, device: str, compile_model: bool, memory_format: str) -> float:
    """Memory a training step needs above the model, gradients and optimizer state, in MiB."""
    torch.manual_seed(0)
    model = (glowlab_model(width, memory_format) if kind == "glowlab" else normflows_model(width)).to(device)
    step = trainer(kind, model, torch.rand(batch, *SHAPE, device=device) - 0.5, compile_model)
    step()  # gradients and Adam state now exist
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = current_rss_mib()
    reset_peak_rss()  # the peak of the measured steps only, not of the first one
    for _ in range(2):
        step()
    return peak_rss_mib() - base


def saved_activations(kind: str, model: torch.nn.Module, x: torch.Tensor) -> float:
    """MiB that autograd keeps for the backward pass of one training loss (distinct storages)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_function(kind, model)(x)
    del loss
    return sum(storages.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--normflows-width", type=int, help="default: --width")
    parser.add_argument("--pairs", type=int, default=20, help="alternating training steps per model")
    parser.add_argument("--compile", action="store_true", help="torch.compile glowlab's encoding pass")
    parser.add_argument("--memory-format", default="channels_last", help="glowlab's: channels_last or contiguous")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    nf_width = args.normflows_width or args.width
    if args.memory_worker:
        width = args.width if args.memory_worker == "glowlab" else nf_width
        peak = peak_memory(args.memory_worker, width, args.batch, args.device, args.compile, args.memory_format)
        print(json.dumps(peak))
        return

    torch.manual_seed(0)
    models = {
        "glowlab": glowlab_model(args.width, args.memory_format).to(args.device),
        "normflows": normflows_model(nf_width).to(args.device),
    }
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    x = torch.rand(args.batch, *SHAPE, device=args.device) - 0.5
    steps = {k: trainer(k, m, x, args.compile) for k, m in models.items()}
    draws = {k: sampler(m, args.batch) for k, m in models.items()}
    for k in models:  # ActNorm initialisation, allocator and (with --compile) compilation
        for _ in range(2):
            steps[k]()
            draws[k]()
    train_t = {k: [] for k in models}
    sample_t = {k: [] for k in models}
    for i in range(args.pairs):
        order = list(models) if i % 2 == 0 else list(models)[::-1]
        for k in order:
            train_t[k].append(timed(steps[k], args.device))
        for k in order:
            sample_t[k].append(timed(draws[k], args.device))
    peak = {}
    for k in models:
        cmd = [
            sys.executable,
            __file__,
            "--memory-worker",
            k,
            "--device",
            args.device,
            "--batch",
            str(args.batch),
            "--width",
            str(args.width),
            "--normflows-width",
            str(nf_width),
            "--memory-format",
            args.memory_format,
            *(["--compile"] if args.compile else []),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=live_memory_env()).stdout
        peak[k] = json.loads(out.strip().splitlines()[-1])

    def rate(times: list[float]) -> float:
        return args.batch / statistics.median(times)

    train_ratio = statistics.median(n / g for g, n in zip(train_t["glowlab"], train_t["normflows"], strict=True))
    sample_ratio = statistics.median(n / g for g, n in zip(sample_t["glowlab"], sample_t["normflows"], strict=True))
    saved = {k: saved_activations(k, m, x) for k, m in models.items()}
    print(
        f"config: 3x32x32, L={LEVELS}, K={STEPS}, affine, LU 1x1, batch {args.batch}, float32, {args.device}; "
        f"glowlab {args.memory_format}{', compiled' if args.compile else ''}"
    )
    for k in models:
        print(
            f"{k:>10}: {params[k] / 1e6:6.2f} M params  train {rate(train_t[k]):8.1f} img/s  "
            f"sample {rate(sample_t[k]):8.1f} img/s  saved for backward {saved[k]:6.1f} MiB  "
            f"step peak {peak[k]:6.0f} MiB"
        )
    print(f"parameter ratio glowlab/normflows: {params['glowlab'] / params['normflows']:.3f}")
    print(f"training throughput, glowlab / normflows (median of {args.pairs} alternating pairs): {train_ratio:.2f}x")
    print(f"sampling throughput, glowlab / normflows: {sample_ratio:.2f}x")
    print(f"saved for backward, glowlab / normflows: {saved['glowlab'] / saved['normflows']:.2f}x")
    measure = "RSS" if args.device == "cpu" else "max_memory_allocated"
    print(f"step peak {measure} above weights, glowlab / normflows: {peak['glowlab'] / peak['normflows']:.2f}x")


if __name__ == "__main__":
    main()
