"""Checks of the GPU training path that need a CUDA device; one line per check, exit status 1 on a failure.

The CPU test suite checks the same properties on the CPU (tests/test_fast_path.py: no operator
that would synchronise, one dynamo graph, the captured step's bookkeeping with an emulated
capture). Here they run for real:

1. sync-free: a whole training step (forward, backward, gradient clipping, fused Adam) under
   ``torch.cuda.set_sync_debug_mode("error")``, which raises on any host synchronisation;
2. capture: a CUDA-graph replay gives the eager step's loss, per-image values and gradients, batch
   after batch (unconditional, class-conditional, invertible backprop, bf16 autocast);
3. compile: ``Glow.compile_steps`` gives the eager log-probabilities and gradients;
4. training: a Lightning run with ``cuda_graphs=True`` ends with the parameters of the eager run.

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import sys
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from glowlab.models import MultiscaleConfig
from glowlab.training import GlowModule
from glowlab.training.capture import CapturedStep
from glowlab.training.module import configure_clipping, optimizer_with_warmup

SMALL = dict(image_shape=(3, 32, 32), levels=3, steps=4, hidden_channels=64, n_bins=256)
failures: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def max_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def batch(n: int, classes: int | None, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = torch.rand(n, *SMALL["image_shape"], device=device) - 0.5
    return x, (torch.randint(0, classes, (n,), device=device) if classes else None)


def check_sync_free() -> None:
    torch.manual_seed(0)
    module = GlowModule(MultiscaleConfig(**SMALL, num_classes=10), optimizer="adam").cuda()
    optimizer = optimizer_with_warmup(module, module.hparams)["optimizer"]
    x, y = batch(16, 10, "cuda")
    module.losses(x, y)[0].backward()  # ActNorm's initialisation reads statistics once, before
    optimizer.step()
    module.log = lambda *args, **kwargs: None  # no Trainer here; configure_clipping logs the norm
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        optimizer.zero_grad(set_to_none=True)
        loss, _ = module.losses(x, y)
        loss.backward()
        configure_clipping(module, 1.0, "norm")
        optimizer.step()
        ok, detail = True, "forward, backward, clipping and fused Adam ran with sync debug mode 'error'"
    except RuntimeError as error:
        ok, detail = False, str(error).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    report("sync-free training step", ok, detail)


def check_capture(name: str, precision: str = "32", **options) -> None:
    torch.manual_seed(0)
    classes = options.get("num_classes")
    module = GlowModule(MultiscaleConfig(**{**SMALL, **options})).cuda()
    x, y = batch(16, classes, "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        module.losses(x, y)[0].backward()
        params = [p for p in module.parameters() if p.requires_grad]
        start = time.perf_counter()
        graph = CapturedStep(module.losses, params, x, y, backend="cuda")
        seconds = time.perf_counter() - start
    worst = 0.0
    for _ in range(3):
        x2, y2 = batch(16, classes, "cuda")
        with autocast:
            loss, values = graph.replay(x2, y2)
        replayed = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        with autocast:
            eager_loss, eager_values = module.losses(x2, y2)
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
    compiled = GlowModule(MultiscaleConfig(**SMALL)).cuda()
    eager = GlowModule(MultiscaleConfig(**SMALL)).cuda()
    x, _ = batch(16, None, "cuda")
    compiled.model.log_prob(x)
    eager.load_state_dict(compiled.state_dict())
    start = time.perf_counter()
    compiled.model.compile_steps()
    results = []
    for module in (eager, compiled):
        log_prob = module.model.log_prob(x)
        results.append((log_prob, torch.autograd.grad(log_prob.mean(), list(module.parameters()))))
    seconds = time.perf_counter() - start
    worst = max(
        max_relative(results[1][0], results[0][0]),
        *(max_relative(a, b) for a, b in zip(results[1][1], results[0][1], strict=True)),
    )
    report("compile_steps", worst < 1e-3, f"max relative difference {worst:.2e}; compiled and ran in {seconds:.1f} s")


def check_training() -> None:
    torch.backends.cudnn.deterministic = True
    runs = {}
    for graphs in (False, True):
        L.seed_everything(0)
        module = GlowModule(MultiscaleConfig(**SMALL), lr=1e-3, warmup_steps=5, cuda_graphs=graphs)
        data = DataLoader(
            TensorDataset(torch.rand(64 * 6, *SMALL["image_shape"]) - 0.5, torch.zeros(64 * 6)), batch_size=64
        )
        trainer = L.Trainer(
            accelerator="gpu",
            devices=1,
            max_steps=30,
            gradient_clip_val=1.0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=data)
        runs[graphs] = (module, time.perf_counter() - start)
    (eager, eager_s), (captured, captured_s) = runs[False], runs[True]
    worst = max(max_relative(a, b) for a, b in zip(captured.parameters(), eager.parameters(), strict=True))
    report(
        "Lightning training with cuda_graphs",
        captured._graph is not None and worst < 1e-3,
        f"captured={captured._graph is not None}, max relative parameter difference after 30 steps {worst:.2e}; "
        f"fit {eager_s:.1f} s eager, {captured_s:.1f} s with cuda_graphs",
    )
    torch.backends.cudnn.deterministic = False


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    check_sync_free()
    check_capture("unconditional")
    check_capture("conditional", num_classes=10)
    check_capture("invertible backprop", backprop="invertible")
    check_capture("bf16 autocast", precision="bf16")
    check_compile()
    check_training()
    print(f"{len(failures)} of 8 checks failed" if failures else "all 8 checks passed", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
