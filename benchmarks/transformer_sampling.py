"""Sampling time of the transformer flow with and without its key/value cache.

Sampling inverts each block patch by patch. With the cache each step runs the transformer on one
new token and attends to the stored keys and values of the earlier ones (N tokens per block and
sample); without it each step reruns the causal pass over the whole prefix (N(N+1)/2 tokens).
Both give the same images (the maximum difference is printed). Times are medians of ``--repeats``
runs, alternating the two, in one process with ``--threads`` CPU threads.

    python benchmarks/transformer_sampling.py --ckpt runs/digits-transformer/version_0/checkpoints/best.ckpt
    python benchmarks/transformer_sampling.py            # the model of configs/digits-transformer.yaml, untrained
    python benchmarks/transformer_sampling.py --image-shape 1 32 32 --num-samples 16   # 256 patches
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml

from glowlab.files import write_json

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits-transformer.yaml"


def build(ckpt: str | None, image_shape: tuple[int, int, int]) -> torch.nn.Module:
    """The checkpoint's model, or the digits transformer config's for ``image_shape`` images, untrained."""
    from glowlab.models import MultiscaleConfig, image_flow
    from glowlab.models.io import load

    if ckpt:
        return load(ckpt)
    options = yaml.safe_load(CONFIG.read_text())["model"]["flow"]
    return image_flow(MultiscaleConfig(image_shape=image_shape, n_bins=17, **options)).eval()


def timed(model: torch.nn.Module, n: int, cache: bool, seed: int) -> tuple[float, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    x = model.sample(n, temperature=1.0, generator=generator, cache=cache)
    return time.perf_counter() - start, x


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="a transformer-flow checkpoint or exported folder (default: untrained)")
    parser.add_argument(
        "--image-shape", type=int, nargs=3, default=[1, 8, 8], help="C H W of the untrained model (no --ckpt)"
    )
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build(args.ckpt, tuple(args.image_shape))
    if model.config.architecture != "transformer":
        parser.error(f"--ckpt {args.ckpt}: a {model.config.architecture} model, not a transformer flow")
    timed(model, 2, True, 0)  # first-call allocations outside the timing
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    for r in range(args.repeats):
        seconds, cached = timed(model, args.num_samples, True, r)
        times["cached"].append(seconds)
        seconds, uncached = timed(model, args.num_samples, False, r)
        times["uncached"].append(seconds)
        difference = float((cached - uncached).abs().max())
    _, h, w = model.image_shape
    p = model.config.patch_size
    result = {
        "patches": (h // p) * (w // p),
        "blocks": model.config.steps,
        "num_samples": args.num_samples,
        "threads": args.threads,
        "cached_s": statistics.median(times["cached"]),
        "uncached_s": statistics.median(times["uncached"]),
        "max_abs_difference": difference,
    }
    result["speedup"] = result["uncached_s"] / result["cached_s"]
    print(
        f"{args.num_samples} samples, {result['patches']} patches x {result['blocks']} blocks, "
        f"{args.threads} thread(s): "
        f"cached {result['cached_s'] * 1000:.0f} ms, uncached {result['uncached_s'] * 1000:.0f} ms "
        f"(x{result['speedup']:.2f}); max |cached - uncached| = {difference:.2e}"
    )
    if args.out:
        write_json(args.out, result)  # strict JSON: no NaN or Infinity
    return result


if __name__ == "__main__":
    main()
