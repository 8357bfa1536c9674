"""How long ``torch.compile`` takes for Glow: per-step (``model.compile: true``) against the whole model.

``Glow.compile_steps`` compiles one graph per flow-step shape and reuses it for every step of that
shape, so its compile time should not grow with the depth K; compiling ``Glow.evaluate`` whole
traces every step into one graph, which grows with K. For each K this builds the model, runs one
eager batch (ActNorm initialisation), then times the first compiled training pass (forward and
backward, which is when compilation happens) and counts the graphs dynamo produced. Each row runs
in a fresh process with an empty inductor cache, so no row reuses another's work.

    python benchmarks/compile_time.py                      # CPU, K = 4, 8, 16 at width 64
    python benchmarks/compile_time.py --device cuda --depths 8 32 --width 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def worker(mode: str, depth: int, width: int, device: str) -> dict:
    from torch._dynamo.utils import counters

    from glowlab.models import Glow

    torch.manual_seed(0)
    model = Glow(image_shape=(3, 32, 32), levels=3, steps=depth, hidden_channels=width).to(device)
    x = torch.rand(16, 3, 32, 32, device=device) - 0.5
    model.log_prob(x).mean().backward()  # ActNorm initialisation, eagerly
    start = time.perf_counter()
    if mode == "per-step":
        model.compile_steps()
        log_prob = model.log_prob
    else:
        log_prob = torch.compile(model.log_prob, dynamic=False)
    log_prob(x).mean().backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "graphs": counters["stats"]["unique_graphs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=["per-step", "whole"], choices=["per-step", "whole"])
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.width, args.device)))
        return
    print(f"Glow 3x32x32, L=3, width {args.width}, batch 16, {args.device}, torch {torch.__version__}")
    for depth in args.depths:
        for mode in args.modes:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                cmd = [sys.executable, __file__, "--worker", mode, str(depth), "--width", str(args.width)]
                cmd += ["--device", args.device]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"K={depth:<3} {mode:>8}: first compiled pass {row['seconds']:7.1f} s, {row['graphs']} graphs")


if __name__ == "__main__":
    main()
