"""The cost asymmetry of MAF and IAF, and what continuous flows cost.

Part 1: MAF and IAF with the same architecture (and the same weights: IAF is MAF's mirror) at
D = 64, timing ``log_prob`` (density) and ``sample`` on one batch. MAF's density is one MADE pass
and its sampling D passes; IAF is the other way round. Medians over ``--repeats``, alternating the
two models so drift hits both.

Part 2: a CNF (FFJORD) at several D, timing one training step (forward with the training
divergence estimator, backward) and counting function evaluations, for exact vs Hutchinson
divergence and adjoint vs direct backprop, against a RealNVP-style coupling flow of similar size as
the discrete baseline.

    python benchmarks/flow_families.py                     # CPU, about 2 minutes
    python benchmarks/flow_families.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics

import torch
from timing import timed

from glowlab.flows.autoregressive import IAF, MAF
from glowlab.flows.base import FlowSequence
from glowlab.flows.continuous import CNF
from glowlab.models.density import FlowModel, make_vector_flow


def autoregressive(features: int, layers: int, hidden: int, batch: int, repeats: int, device: str) -> None:
    torch.manual_seed(0)
    maf = FlowModel(
        FlowSequence([MAF(features, hidden, 2, order=("natural", "reversed")[i % 2]) for i in range(layers)]), features
    )
    iaf = FlowModel(
        FlowSequence([IAF(features, hidden, 2, order=("natural", "reversed")[i % 2]) for i in range(layers)]), features
    )
    with torch.no_grad():
        for p in maf.parameters():
            p.add_(0.01 * torch.randn_like(p))  # away from the zero-initialised identity
    iaf.load_state_dict(maf.state_dict())
    maf, iaf = maf.to(device).eval(), iaf.to(device).eval()
    x = torch.randn(batch, features, device=device)
    times: dict[str, list[float]] = {k: [] for k in ("maf_density", "iaf_density", "maf_sample", "iaf_sample")}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up and is dropped below
            times["maf_density"].append(timed(lambda: maf.log_prob(x), device))
            times["iaf_density"].append(timed(lambda: iaf.log_prob(x), device))
            times["maf_sample"].append(timed(lambda: maf.sample(batch), device))
            times["iaf_sample"].append(timed(lambda: iaf.sample(batch), device))
    ms = {k: 1000 * statistics.median(v[1:]) for k, v in times.items()}
    print(f"\nMAF vs IAF: D={features}, {layers} layers, MADE width {hidden}, batch {batch}, {device}")
    print(f"{'':8}{'density ms':>12}{'sample ms':>12}{'sample/density':>16}")
    for name in ("maf", "iaf"):
        d, s = ms[f"{name}_density"], ms[f"{name}_sample"]
        print(f"{name.upper():8}{d:12.2f}{s:12.2f}{s / d:16.3g}")
    print(
        f"MAF density is {ms['iaf_density'] / ms['maf_density']:.1f}x faster than IAF's; "
        f"IAF sampling is {ms['maf_sample'] / ms['iaf_sample']:.1f}x faster than MAF's"
    )


def cnf_step(model: FlowModel, x: torch.Tensor, device: str) -> tuple[float, int]:
    """Seconds of one training step (forward and backward) and the forward solve's evaluations."""
    model.train()
    model.zero_grad(set_to_none=True)
    cnf = model.flow.layers[0]
    forward_nfe = 0

    def step() -> None:
        nonlocal forward_nfe
        loss = -model.log_prob(x).mean()
        forward_nfe = cnf.nfe
        loss.backward()

    return timed(step, device), forward_nfe


def continuous(dims: list[int], batch: int, repeats: int, device: str) -> None:
    print(f"\nCNF (FFJORD, one block, width 64, dopri5 rtol=atol=1e-5) training step, batch {batch}, {device}")
    print(f"{'D':>4}{'divergence':>12}{'backprop':>10}{'forward NFE':>13}{'s/step':>10}{'x coupling':>12}")
    for d in dims:
        torch.manual_seed(0)
        x = torch.randn(batch, d, device=device)
        coupling = FlowModel(make_vector_flow("realnvp", d, 4, 64, 2), d).to(device)
        base = statistics.median(
            timed(lambda c=coupling, v=x: (-c.log_prob(v).mean()).backward(), device) for _ in range(repeats)
        )
        for divergence in ("exact", "hutchinson"):
            for adjoint in (False, True):
                torch.manual_seed(0)
                cnf = CNF(d, 64, 2, divergence=divergence, adjoint=adjoint, rtol=1e-5, atol=1e-5)
                with torch.no_grad():
                    for p in cnf.parameters():
                        p.mul_(2.0)  # nontrivial dynamics, so the adaptive solver takes several steps
                model = FlowModel(FlowSequence([cnf]), d).to(device)
                runs = [cnf_step(model, x, device) for _ in range(repeats)]
                seconds = statistics.median(r[0] for r in runs)
                nfe = statistics.median(r[1] for r in runs)
                label = "adjoint" if adjoint else "direct"
                print(f"{d:4d}{divergence:>12}{label:>10}{nfe:13.0f}{seconds:10.3f}{seconds / base:12.0f}")
        print(f"{'':4}{'coupling':>12}{'direct':>10}{'-':>13}{base:10.4f}{1:12.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cnf-dims", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--cnf-batch", type=int, default=256)
    args = parser.parse_args()
    autoregressive(args.features, args.layers, args.hidden, args.batch, args.repeats, args.device)
    continuous(args.cnf_dims, args.cnf_batch, max(3, args.repeats // 2), args.device)


if __name__ == "__main__":
    main()
