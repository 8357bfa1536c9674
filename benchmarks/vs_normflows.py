"""Is glowlab's Glow at least as good as normflows' at the same budget? Test bits/dim on digits.

Trains two multiscale Glows on the prepared digits data (1x8x8, 17 grey levels) with the main
job's budget from ``configs/digits.yaml`` and scores both the same way:

* glowlab: ``glowlab.models.MultiscaleFlow`` with the config's ``model.flow`` (L=2, K=8, width 64,
  affine coupling, LU 1x1 convolutions, learned top prior);
* normflows (1.7.3): its ``MultiscaleFlow`` of ``GlowBlock``s as built by
  ``adapters/normflows_glow.py``, L=2, K=8, at the coupling width whose parameter count is closest
  to glowlab's (searched; both counts printed). normflows models [0, 1): it is fed ``x + 0.5``, a
  shift with unit Jacobian, so its ``log_prob`` is a density on [-0.5, 0.5) like glowlab's.

The budget is the config's for both: its optimizer steps (2000), batch (64), Adamax at lr 2e-3
with glowlab's linear warm-up (``optimizer_with_warmup``: factor min(1, (step + 1) / 200)),
gradient clipping by total norm (50), seed 0, and the same loss (mean bits/dim; normflows' own
``forward_kld`` is in nats, 1 / (D ln 2) = 44x larger, which would change what the clipping and
Adamax's epsilon do). Each model gets a fresh ``ShardDataModule`` with the config's options and
seed, so both read the same stream of batches with the same uniform dequantization noise (the data
module's ``on_after_batch_transfer`` in training mode, called here outside Lightning); a sha256
over every batch checks that. ActNorm layers of both initialise from the first batch.

Score: the test split, per-image bits/dim with ``glowlab.likelihood.bits_per_dim`` averaged over
``--draws`` dequantizations, draw ``d`` being the per-image noise of seed ``d``
(``per_sample_uniform``, as ``glowlab evaluate bpd`` draws; draw 0 is what ``glowlab fit``'s test
uses), then the mean over images and its standard error. The difference glowlab - normflows is
paired over the test images (its standard error is far below either model's). Training wall time
includes loading and dequantizing the batches, the same work for both. One torch thread by default.

``--seeds`` repeats the comparison over model initialisations (the data stream stays the config's):
with one seed the difference's standard error covers the test images only, and the spread between
initialisations is larger than it. ``--ema DECAY`` adds a third row, glowlab's Glow trained the same
way and scored with its exponential moving average of the weights (``model.ema_decay``), which
normflows has no counterpart of.

    python benchmarks/vs_normflows.py                       # prepares digits in a temporary folder
    python benchmarks/vs_normflows.py --root data/digits --seeds 0 1 2 --ema 0.999 --out results.json
    python benchmarks/vs_normflows.py --quick               # 50 steps: a smoke test

References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018;
Stimper et al., "normflows: A PyTorch Package for Normalizing Flows", JOSS 2023; Theis et al., "A
note on the evaluation of generative models", ICLR 2016.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import lightning as L
import torch
import yaml
from torch import Tensor, nn

from glowlab.files import write_json
from glowlab.likelihood import bits_per_dim, dequantize, mean_and_stderr, per_sample_uniform
from glowlab.models import MultiscaleFlow
from glowlab.training.datamodule import ShardDataModule
from glowlab.training.module import WeightAverage, optimizer_with_warmup

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits.yaml"
ADAPTER = Path(__file__).resolve().parent / "adapters" / "normflows_glow.py"
QUICK_STEPS = 50
LogProb = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Budget:
    """What configs/digits.yaml fixes for the comparison."""

    flow: dict
    optimizer: str
    lr: float
    warmup_steps: int
    batch_size: int
    eval_batch_size: int
    shuffle_buffer: int
    max_steps: int
    clip: float
    seed: int


def read_budget(path: Path = CONFIG) -> Budget:
    config = yaml.safe_load(path.read_text())
    model, data, trainer = config["model"], config["data"], config["trainer"]
    return Budget(
        flow=dict(model["flow"]),
        optimizer=model["optimizer"],
        lr=float(model["lr"]),
        warmup_steps=int(model["warmup_steps"]),
        batch_size=int(data["batch_size"]),
        eval_batch_size=int(data["eval_batch_size"]),
        shuffle_buffer=int(data["shuffle_buffer"]),
        max_steps=int(trainer["max_steps"]),
        clip=float(trainer["gradient_clip_val"]),
        seed=int(config["seed_everything"]),
    )


@contextlib.contextmanager
def digits_root(root: str | None) -> Iterator[str]:
    """A prepared digits folder: ``root`` (prepared there if it has no manifest) or a temporary one."""
    with contextlib.ExitStack() as stack:
        folder = Path(root) if root else Path(stack.enter_context(tempfile.TemporaryDirectory())) / "digits"
        if not (folder / "manifest.json").exists():
            cmd = [sys.executable, "-m", "glowlab", "prepare", "digits", "--out", str(folder), "--quiet"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        yield str(folder)


def data_module(root: str, budget: Budget) -> ShardDataModule:
    """The config's data module, its training hook switched on outside Lightning.

    ``on_after_batch_transfer`` draws fresh training noise (seeded by the seed and the batch
    number) when its trainer is training; a stand-in with the fields it reads makes it do so.
    """
    data = ShardDataModule(
        root=root,
        batch_size=budget.batch_size,
        eval_batch_size=budget.eval_batch_size,
        shuffle_buffer=budget.shuffle_buffer,
        seed=budget.seed,
    )
    data.trainer = SimpleNamespace(training=True, global_rank=0, world_size=1, accumulate_grad_batches=1)
    return data


def load_adapter() -> ModuleType:
    spec = importlib.util.spec_from_file_location("normflows_glow", ADAPTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_normflows(adapter: ModuleType, flow: dict, width: int) -> nn.Module:
    """The adapter's normflows Glow with glowlab's image shape, levels and steps, ``width`` wide."""
    config = dict(image_shape=flow["image_shape"], levels=flow["levels"], steps=flow["steps"], hidden_channels=width)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.lu is deprecated.*")  # inside normflows
        return adapter.build(config)


def matching_width(adapter: ModuleType, flow: dict, target: int, limit: int = 1024) -> int:
    """normflows' coupling width whose parameter count is closest to ``target`` (ties: the smaller)."""
    best, best_gap = 1, None
    for width in range(1, limit + 1):
        gap = count(build_normflows(adapter, flow, width)) - target
        if best_gap is None or abs(gap) < abs(best_gap):
            best, best_gap = width, gap
        if gap > 0:  # the count grows with the width: wider is only further away
            break
    return best


def train(
    name: str,
    model: nn.Module,
    log_prob: LogProb,
    data: ShardDataModule,
    budget: Budget,
    steps: int,
    average: WeightAverage | None = None,
) -> dict:
    """``steps`` optimizer steps on the mean bits/dim, as ``glowlab fit`` takes them; ``average`` follows each."""
    c, h, w = data.image_shape
    num_dims, n_bins = c * h * w, data.n_bins
    hp = SimpleNamespace(optimizer=budget.optimizer, lr=budget.lr, weight_decay=0.0, warmup_steps=budget.warmup_steps)
    configured = optimizer_with_warmup(model, hp)
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    params = list(model.parameters())
    loader = data.train_dataloader()
    digest = hashlib.sha256()
    losses: list[float] = []
    skipped = done = 0
    model.train()
    start = time.perf_counter()
    while done < steps:
        for batch in loader:
            moved = data.on_after_batch_transfer(batch, 0)  # (x, labels, indices, ...)
            x, indices = moved[0], moved[2]
            digest.update(indices.numpy().tobytes())
            digest.update(x.numpy().tobytes())
            optimizer.zero_grad(set_to_none=True)
            loss = bits_per_dim(log_prob(x), num_dims, n_bins).mean()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, budget.clip, foreach=True)
            if torch.isfinite(loss) and torch.isfinite(norm):
                optimizer.step()
            else:  # as glowlab's NonFiniteGuard: the step is skipped, the schedule goes on
                skipped += 1
            if average is not None:
                average.update(model)
            schedule.step()
            if torch.isfinite(loss):  # a skipped step's loss is counted in nonfinite_steps, not averaged
                losses.append(float(loss.detach()))
            done += 1
            if done % 500 == 0 or done == steps:
                recent = losses[-100:] or [float("nan")]
                print(
                    f"  {name}: step {done}/{steps}, train bits/dim {sum(recent) / len(recent):.4f} (last "
                    f"{len(recent)} finite), {time.perf_counter() - start:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
            if done == steps:
                break
    train_s = time.perf_counter() - start
    recent = losses[-100:]
    return {
        "train_s": train_s,
        "img_s": steps * budget.batch_size / train_s,
        "final_train_bpd": sum(recent) / len(recent) if recent else None,  # None: no finite step
        "nonfinite_steps": skipped,
        "batches_sha256": digest.hexdigest(),
    }


@torch.no_grad()
def evaluate(model: nn.Module, log_prob: LogProb, data: ShardDataModule, draws: int) -> tuple[Tensor, Tensor]:
    """``(indices, bits/dim (draws, N))`` over the test split, sorted by index, as ``glowlab evaluate bpd``."""
    model.eval()
    n_bins = data.n_bins
    seen, rows = [], []
    for batch in data.test_dataloader():
        levels, indices = batch[0], batch[2]  # (levels, labels, indices) before the transfer hook
        shape = tuple(levels.shape[1:])
        num_dims = levels[0].numel()
        per_draw = []
        for d in range(draws):
            x = dequantize(levels, n_bins, noise=per_sample_uniform(indices, shape, seed=d))
            per_draw.append(bits_per_dim(log_prob(x), num_dims, n_bins).double())
        batch = torch.stack(per_draw)
        bad = ~torch.isfinite(batch).all(dim=0)
        if bool(bad.any()):
            raise ValueError(f"bits/dim is not finite for test image(s) {indices[bad].tolist()[:5]}")
        seen.append(indices)
        rows.append(batch)
    indices, bits = torch.cat(seen), torch.cat(rows, dim=1)
    order = torch.argsort(indices)
    return indices[order], bits[:, order]


def train_and_score(
    name: str,
    seed: int,
    root: str,
    flow: dict,
    width: int,
    adapter: ModuleType,
    budget: Budget,
    args: argparse.Namespace,
) -> tuple[dict, Tensor, Tensor]:
    """One implementation, initialised with ``seed``: its row, and the test ``(indices, per-image bits/dim)``."""
    L.seed_everything(seed, verbose=False)
    average = None
    if name == "normflows":
        model = build_normflows(adapter, flow, width)
        log_prob = _normflows_log_prob(model)
    else:
        model = MultiscaleFlow(**flow)
        log_prob = model.log_prob
        average = WeightAverage(model, args.ema) if name == "glowlab+ema" else None
    data = data_module(root, budget)
    row = {"parameters": count(model), "hidden_channels": width if name == "normflows" else flow["hidden_channels"]}
    row.update(train(name, model, log_prob, data, budget, args.steps_to_run, average))
    scored = (average.model, average.model.log_prob) if average is not None else (model, log_prob)
    indices, bits = evaluate(*scored, data, args.draws)
    per_image = bits.mean(dim=0)
    row["test_bpd"], row["test_stderr"] = mean_and_stderr(per_image)
    row["test_bpd_per_draw"] = bits.mean(dim=1).tolist()
    row["test_images"] = len(indices)
    return row, indices, per_image


def run(args: argparse.Namespace) -> dict:
    budget = read_budget()
    args.steps_to_run = args.steps if args.steps is not None else QUICK_STEPS if args.quick else budget.max_steps
    torch.set_num_threads(args.threads)
    adapter = load_adapter()
    names = ["glowlab", "normflows"] + (["glowlab+ema"] if args.ema is not None else [])
    seeds = args.seeds if args.seeds is not None else [budget.seed]
    with digits_root(args.root) as root:
        probe = data_module(root, budget)  # the data's shape and grey levels, as `glowlab fit` links them
        flow = {**budget.flow, "image_shape": tuple(probe.image_shape), "n_bins": probe.n_bins}
        width = matching_width(adapter, flow, count(MultiscaleFlow(**flow)))
        runs = []
        for seed in seeds:
            results: dict = {}
            scores: dict[str, tuple[Tensor, Tensor]] = {}
            for name in names:
                row, indices, per_image = train_and_score(name, seed, root, flow, width, adapter, budget, args)
                results[name], scores[name] = row, (indices, per_image)
            if any(not torch.equal(scores["glowlab"][0], indices) for indices, _ in scores.values()):
                raise RuntimeError("the models were scored on different test images")
            differences = {
                f"{name} - normflows": mean_and_stderr(scores[name][1] - scores["normflows"][1])
                for name in names
                if name != "normflows"
            }
            same = len({row["batches_sha256"] for row in results.values()}) == 1
            runs.append({"seed": seed, "results": results, "differences": differences, "same_training_batches": same})
    summary = {}
    for key in runs[0]["differences"]:
        summary[key] = mean_and_stderr(torch.tensor([r["differences"][key][0] for r in runs]))
    means = {name: mean_and_stderr(torch.tensor([r["results"][name]["test_bpd"] for r in runs])) for name in names}
    return {
        "config": {
            "image_shape": list(flow["image_shape"]),
            "n_bins": flow["n_bins"],
            "flow": {k: v for k, v in budget.flow.items() if k != "image_shape"},
            "steps": args.steps_to_run,
            "batch_size": budget.batch_size,
            "optimizer": budget.optimizer,
            "lr": budget.lr,
            "warmup_steps": budget.warmup_steps,
            "gradient_clip_val": budget.clip,
            "data_seed": budget.seed,
            "seeds": seeds,
            "ema_decay": args.ema,
            "draws": args.draws,
            "threads": args.threads,
            "torch": torch.__version__,
            "normflows": importlib.metadata.version("normflows"),
        },
        "runs": runs,
        "mean_test_bpd": {name: {"mean": m, "stderr_over_seeds": se} for name, (m, se) in means.items()},
        "difference_bpd": {key: {"mean": m, "stderr_over_seeds": se} for key, (m, se) in summary.items()},
    }


def _normflows_log_prob(model: nn.Module) -> LogProb:
    def log_prob(x: Tensor) -> Tensor:
        return model.log_prob(x + 0.5, None)  # [-0.5, 0.5) -> [0, 1): unit Jacobian

    return log_prob


def report(out: dict) -> None:
    c = out["config"]
    shape = "x".join(map(str, c["image_shape"]))
    print(
        f"Glow on digits ({shape}, {c['n_bins']} levels): L={c['flow']['levels']} K={c['flow']['steps']}, "
        f"{c['flow']['coupling']} coupling, {c['flow']['permutation']} 1x1 convolutions; {c['steps']} steps, "
        f"batch {c['batch_size']}, {c['optimizer']} lr {c['lr']:g} (warm-up {c['warmup_steps']}), clip "
        f"{c['gradient_clip_val']:g}, data seed {c['data_seed']}, {c['threads']} thread(s), torch {c['torch']}, "
        f"normflows {c['normflows']}"
    )
    first = out["runs"][0]["results"]
    print(
        f"normflows width {first['normflows']['hidden_channels']}: the parameter count closest to glowlab's at "
        f"width {first['glowlab']['hidden_channels']}"
    )
    print(
        f"{'seed':>4}  {'implementation':<14}{'parameters':>11}  {'test bits/dim ± s.e.':>21}  {'train s':>8}  "
        f"{'img/s':>7}  {'train bpd':>9}"
    )
    for run in out["runs"]:
        for name, row in run["results"].items():
            print(
                f"{run['seed']:>4}  {name:<14}{row['parameters']:>11,}  {row['test_bpd']:>12.4f} ± "
                f"{row['test_stderr']:.4f}  {row['train_s']:>8.1f}  {row['img_s']:>7.1f}  "
                + (f"{row['final_train_bpd']:>9.4f}" if row["final_train_bpd"] is not None else f"{'-':>9}")
            )
        for key, (mean, se) in run["differences"].items():
            print(f"      {key}: {mean:+.4f} ± {se:.4f} bits/dim (paired over the test images)")
        if not run["same_training_batches"]:
            print("      the models did NOT train on the same batches and noise")
    n = first["glowlab"]["test_images"]
    print(f"Over {len(out['runs'])} initialisation seed(s), {n} test images, {c['draws']} dequantization draws each:")
    for name, value in out["mean_test_bpd"].items():
        print(f"  {name:<14} mean test bits/dim {value['mean']:.4f} ± {value['stderr_over_seeds']:.4f}")
    for key, value in out["difference_bpd"].items():
        print(f"  {key}: {value['mean']:+.4f} ± {value['stderr_over_seeds']:.4f} bits/dim (± over seeds)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="optimizer steps for each model (default: the config's, 2000)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps (a smoke test)")
    parser.add_argument("--root", help="prepared digits (prepared there if missing; default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--draws", type=int, default=4, help="dequantization draws per test image (default: 4)")
    parser.add_argument("--seeds", type=int, nargs="+", help="model initialisation seeds (default: the config's)")
    parser.add_argument("--ema", type=float, help="also glowlab scored with a weight average of this decay")
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if (args.steps is not None and args.steps < 1) or args.draws < 1 or args.threads < 1:
        parser.error("--steps, --draws and --threads must be >= 1")
    out = run(args)
    report(out)
    if args.out:
        write_json(args.out, out)  # strict JSON: no NaN or Infinity
    return out


if __name__ == "__main__":
    main()
