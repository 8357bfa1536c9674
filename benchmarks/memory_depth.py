"""Peak memory of training against depth: standard against invertible backprop.

Each measurement runs in a fresh process (peak RSS on a CPU; ``torch.cuda.max_memory_allocated``
on a GPU) for Glow at the CIFAR shape (3x32x32, L=3) with K = 8, 16, 32 steps per level: model,
Adam, and ``--steps`` full training steps. Prints the peak, the part of it above the memory held
after the first step's parameters, gradients and optimizer state exist ("activations": what
backprop keeps), the seconds per step, and the ratios that matter: invertible K=32 over K=8, and
invertible over standard time.

    python benchmarks/memory_depth.py                      # CPU, width 128, batch 32 (about a minute)
    python benchmarks/memory_depth.py --device cuda --width 512 --batch 64
    python benchmarks/memory_depth.py --device cuda --width 512 --batch 64 --depths 32 --precision bf16

The last line is the paper's CIFAR-10 model (L=3, K=32, width 512) under bf16 autocast; the flow
keeps its log-determinants and log-densities in float32 there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from memory import current_rss_mib, live_memory_env, peak_rss_mib


def measure(mode: str, depth: int, width: int, batch: int, steps: int, device: str, precision: str) -> dict:
    import torch

    from glowlab.likelihood import bits_per_dim
    from glowlab.models import Glow

    torch.manual_seed(0)
    model = Glow(image_shape=(3, 32, 32), levels=3, steps=depth, hidden_channels=width, backprop=mode).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, 32, 32, device=device) - 0.5

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = bits_per_dim(model.log_prob(x), model.num_dims, 256).mean()
        loss.backward()
        optimizer.step()

    def used() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return peak_rss_mib()

    step()  # parameters, gradients and Adam state now exist
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        base = current_rss_mib()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    peak = used()
    return {
        "mode": mode,
        "K": depth,
        "peak_mib": peak,
        "activations_mib": peak - base,
        "s_per_step": seconds,
        "images_per_s": batch / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32", help="bf16: bf16 autocast")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, depth = args.worker[0], int(args.worker[1])
        print(json.dumps(measure(mode, depth, args.width, args.batch, args.steps, args.device, args.precision)))
        return
    rows = []
    for depth in args.depths:
        for mode in ("standard", "invertible"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                mode,
                str(depth),
                "--width",
                str(args.width),
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
                "--device",
                args.device,
                "--precision",
                args.precision,
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=live_memory_env()).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"{r['mode']:>10}  K={r['K']:<3} peak {r['peak_mib']:8.0f} MiB  "
                f"activations {r['activations_mib']:8.0f} MiB  "
                f"{r['s_per_step']:7.2f} s/step  {r['images_per_s']:8.1f} images/s",
                flush=True,
            )
    by = {(r["mode"], r["K"]): r for r in rows}
    lo, hi = min(args.depths), max(args.depths)
    for mode in ("standard", "invertible"):
        print(
            f"{mode:>10}  K={hi} / K={lo}: peak {by[mode, hi]['peak_mib'] / by[mode, lo]['peak_mib']:.2f}x, "
            f"activations {by[mode, hi]['activations_mib'] / max(by[mode, lo]['activations_mib'], 1):.2f}x"
        )
    for depth in args.depths:
        ratio = by["invertible", depth]["s_per_step"] / by["standard", depth]["s_per_step"]
        print(f"time invertible / standard at K={depth}: {ratio:.2f}x")
    print(f"(width {args.width}, batch {args.batch}, {args.device}, precision {args.precision})")


if __name__ == "__main__":
    main()
