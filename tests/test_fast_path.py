"""The GPU training step, checked on the CPU: no host synchronisation, one graph, few operators,
folded layers equal to the plain ones, a captured step equal to the eager one, fused optimizers."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch._dynamo
from helpers import glow_module, perturb
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import glowlab.training.module as training_module
from glowlab.dispatch import OperatorCounter
from glowlab.flows import ActNorm
from glowlab.flows.base import FlowSequence, chain_forward, run_forward
from glowlab.models import FlowStep, Glow, MultiscaleConfig
from glowlab.optim import Adamax
from glowlab.training import GlowModule, Throughput
from glowlab.training.capture import CapturedStep
from glowlab.training.module import optimizer_with_warmup

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

TINY = dict(image_shape=(1, 8, 8), levels=2, steps=2, hidden_channels=8)
VARIANTS = {
    "affine-lu": dict(coupling="affine", permutation="lu"),
    "affine-conv": dict(coupling="affine", permutation="conv"),
    "additive-reverse": dict(coupling="additive", permutation="reverse"),
    "additive-shuffle": dict(coupling="additive", permutation="shuffle"),
    "conditional": dict(num_classes=3),
    "conditional-fixed-top": dict(num_classes=3, learn_top=False),
    "realnvp": dict(architecture="realnvp", permutation="reverse"),
    "nice": dict(architecture="nice", coupling="additive", levels=1, learn_top=False),
}


def batch(kwargs: dict, n: int = 6, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = torch.rand(n, *TINY["image_shape"], dtype=dtype) - 0.5
    return x, (torch.arange(n) % 3 if kwargs.get("num_classes") else None)


def test_operator_counter_sees_what_waits_for_the_device() -> None:
    t = torch.ones(3)
    with OperatorCounter(cpu_is_device=True) as counter:
        t.sum().item()
        bool(t.max() > 0)
        (t * 2).add_(1)
    assert counter.synchronisations == 2
    assert counter.counts["aten._local_scalar_dense.default"] == 2
    with OperatorCounter() as on_host:  # CPU tensors read on the CPU: nothing to wait for
        t.sum().item()
    assert on_host.synchronisations == 0 and on_host.total == 2


@pytest.mark.parametrize("backprop", ["standard", "invertible"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_step_never_waits_for_the_device(name: str, backprop: str) -> None:
    kwargs = VARIANTS[name]
    module = glow_module(n_bins=17, backprop=backprop, **{**TINY, **kwargs})
    x, y = batch(kwargs)
    module.losses(x, y)[0].backward()  # ActNorm's data-dependent initialisation happens once, here
    module.zero_grad()
    with OperatorCounter(cpu_is_device=True) as counter:
        loss, _ = module.losses(x, y)
        loss.backward()
    assert counter.synchronisations == 0, dict(counter.synchronising)
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize(
    "options",
    [
        dict(dequantization="variational", ema_decay=0.99),
        dict(architecture="transformer", noise_std=0.05, num_classes=3, ema_decay=0.99),
    ],
    ids=["glow-variational-ema", "transformer-noise-labels-ema"],
)
def test_newer_training_steps_never_wait_for_the_device(options: dict) -> None:
    # Variational dequantization, the transformer flow's noise and dropped labels, the weight average.
    module = glow_module(n_bins=17, **{**TINY, **options}).train()
    levels = torch.randint(0, 17, (6, *TINY["image_shape"]))
    x = (levels + torch.rand(levels.shape)) / 17 - 0.5
    y = torch.arange(6) % 3 if options.get("num_classes") else None
    module.losses(x, y, levels)[0].backward()  # ActNorm's initialisation, once
    module.ema.update(module.model)  # the first update copies the model whole
    module.zero_grad()
    with OperatorCounter(cpu_is_device=True) as counter:
        loss, _ = module.losses(x, y, levels)
        loss.backward()
        module.ema.update(module.model)
    assert counter.synchronisations == 0, dict(counter.synchronising)
    assert all(p.grad is not None for p in module.model.parameters())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_forward_is_one_graph(name: str) -> None:
    model = Glow(**{**TINY, **VARIANTS[name]}).train()
    x, y = batch(VARIANTS[name])
    model.evaluate(x, y)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model.evaluate)(x, y)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_actnorm_flag_follows_its_buffer_through_load_state_dict() -> None:
    layer = ActNorm(3)
    assert not layer.is_initialized
    layer(torch.randn(8, 3, 4, 4))
    assert layer.is_initialized and bool(layer.initialized)
    fresh = ActNorm(3)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.is_initialized
    # Loading an uninitialised state makes the layer initialise from its next training batch again.
    fresh.load_state_dict(ActNorm(3).state_dict())
    assert not fresh.is_initialized
    fresh(torch.randn(8, 3, 4, 4) * 5 + 2)
    assert fresh.is_initialized and not torch.equal(fresh.logs, ActNorm(3).logs)


@pytest.mark.parametrize(
    "options",
    [
        dict(permutation="lu"),
        dict(permutation="conv"),
        dict(permutation="lu", coupling="additive"),
        dict(permutation="lu", coupling="checkerboard"),
        dict(permutation="lu", num_classes=3),
    ],
    ids=["lu", "conv", "additive", "checkerboard", "conditional"],
)
def test_folded_level_equals_its_layers_run_one_by_one(options: dict) -> None:
    # The level folds every ActNorm into its 1x1 convolution and computes all its coupling nets'
    # output convolutions at once; values and gradients are those of the layers run one by one.
    model = Glow(image_shape=(2, 8, 8), levels=2, steps=3, hidden_channels=8, **options).double()
    x = torch.rand(4, 2, 8, 8, dtype=torch.float64) - 0.5
    y = torch.arange(4) % 3 if options.get("num_classes") else None
    model.log_prob(x, y)
    perturb(model)
    level = model.levels[0]
    folded, folded_logdet = level(x, y)

    def plain(layer, h):  # ActNorm, 1x1 convolution and coupling as three layers
        return FlowSequence.forward(layer, h, y) if isinstance(layer, FlowStep) else run_forward(layer, h, y)

    h, logdets = x, []
    for layer in level.chain():  # its squeeze and steps, then its split
        h, ld = plain(layer, h)
        logdets.append(ld)
    torch.testing.assert_close(folded, h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(folded_logdet, sum(logdets), rtol=1e-12, atol=1e-10)
    weights = torch.randn(folded.shape, dtype=torch.float64)
    names, parameters = zip(*level.named_parameters(), strict=True)
    folded_grads = torch.autograd.grad((folded * weights).sum() + folded_logdet.sum(), parameters)
    plain_grads = torch.autograd.grad((h * weights).sum() + sum(logdets).sum(), parameters)
    for name, got, want in zip(names, folded_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
    squeezed = level.layers[0](x)[0]
    single, single_logdet = level.layers[1](squeezed, y)
    expected, expected_logdet = chain_forward(level.layers[1].layers, squeezed, y)
    torch.testing.assert_close(single, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(single_logdet, expected_logdet, rtol=1e-12, atol=1e-10)


def test_training_step_dispatches_fewer_operators_than_normflows() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    import glow_step

    config = glow_step.CONFIGS["reference"]
    x = torch.rand(config["batch"], *config["image_shape"]) - 0.5
    counts = {}
    for name in ("glowlab", str(BENCHMARKS / "adapters" / "normflows_glow.py")):
        torch.manual_seed(0)
        impl = glow_step.build(name, config, "cpu", 1e-4)
        glow_step.prepare(impl, x, "cpu", "32")
        counts[impl.name] = glow_step.count_operators(impl, x, "cpu", "32")
    ours, theirs = counts["glowlab"], counts["normflows_glow"]
    assert ours["forward"] + ours["backward"] <= theirs["forward"] + theirs["backward"], counts
    assert ours["optimizer"] <= 10, counts  # one fused update, not a loop over the parameters
    assert ours["syncs"] == 0 and theirs["syncs"] > 0, counts


class CountSynchronisations(L.Callback):
    """Host synchronisations of each whole training step (forward, backward, clipping, guard, update)."""

    def __init__(self) -> None:
        self.per_step: dict[int, int] = {}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Adamax reads its skip flag on the host where that is free, on the CPU; count the update
        # a GPU runs.
        for optimizer in trainer.optimizers:
            if isinstance(optimizer, Adamax):
                optimizer.decide_on_device = True

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        self.counter = OperatorCounter(cpu_is_device=True).__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self.counter.__exit__(None, None, None)
        self.per_step[module.global_step - 1] = self.counter.synchronisations


@pytest.mark.parametrize("name", ["adam", "adamax"])
def test_a_guarded_optimizer_step_reads_the_device_only_on_logging_steps(name: str) -> None:
    # Clipping, the non-finite guard and the update decide on the device; the guard reads its
    # count of skipped steps in a row (one value) on the steps Lightning logs (0, 3, 6).
    torch.manual_seed(0)
    module = glow_module(n_bins=17, optimizer=name, **TINY)
    images = torch.rand(64, *TINY["image_shape"]) - 0.5
    images[40:48] = float("nan")  # step 5 is skipped
    count = CountSynchronisations()
    trainer = L.Trainer(
        max_steps=7,
        log_every_n_steps=3,
        gradient_clip_val=1.0,
        callbacks=[count],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(images), batch_size=8))
    assert count.per_step == {0: 1, 1: 0, 2: 0, 3: 1, 4: 0, 5: 0, 6: 1}
    assert int(module.nonfinite.total) == 1
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


@pytest.mark.parametrize("name", ["adam", "adamax"])
def test_fused_and_multi_tensor_optimizers_make_the_plain_update(name: str) -> None:
    torch.manual_seed(0)
    fast = glow_module(n_bins=17, optimizer=name, lr=1e-2, warmup_steps=0, **TINY).double()
    plain = glow_module(n_bins=17, optimizer=name, lr=1e-2, warmup_steps=0, **TINY).double()
    plain.load_state_dict(fast.state_dict())
    optimizers = [
        optimizer_with_warmup(fast, fast.hparams)["optimizer"],
        {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax}[name](plain.parameters(), lr=1e-2, foreach=False),
    ]
    assert optimizers[0].defaults.get("fused" if name == "adam" else "foreach")
    for _ in range(3):
        x, _ = batch({}, dtype=torch.float64)
        for module, optimizer in zip((fast, plain), optimizers, strict=True):
            optimizer.zero_grad()
            module.losses(x, None)[0].backward()
            optimizer.step()
    for a, b in zip(fast.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_captured_step_gives_each_batch_its_own_gradients() -> None:
    torch.manual_seed(0)
    module = glow_module(n_bins=17, num_classes=3, **TINY).double()
    x, y = batch({"num_classes": 3}, dtype=torch.float64)
    module.losses(x, y)[0].backward()
    params = list(module.parameters())
    graph = CapturedStep(module.losses, params, x, y, backend="emulated")
    assert graph.matches(x, y) and not graph.matches(x[:2], y[:2]) and not graph.matches(x, None)
    for _ in range(2):  # twice: replays overwrite the gradients, they never accumulate
        x2, y2 = batch({"num_classes": 3}, dtype=torch.float64)
        loss, values = graph.replay(x2, y2)
        replayed = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        eager_loss, eager_values = module.losses(x2, y2)
        eager_loss.backward()
        torch.testing.assert_close(loss, eager_loss.detach(), rtol=0, atol=0)
        torch.testing.assert_close(values["bpd"], eager_values["bpd"].detach(), rtol=0, atol=0)
        for a, p in zip(replayed, params, strict=True):
            torch.testing.assert_close(a, p.grad, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        CapturedStep(module.losses, params, x, y, backend="cuda")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_capture_compiles_nothing_its_warm_up_did_not(autocast: bool) -> None:
    """Compiled steps are compiled and autotuned in the warm-up, never in the recorded pass.

    The training step before a capture runs with autocast's weight cache on and the capture with it
    off; dynamo guards on that flag, so a warm-up in the step's own state would leave the recompile
    to the recorded pass, where a CUDA capture cannot autotune.
    """
    torch._dynamo.reset()  # other tests' entries count towards the compiled step's recompile limit
    torch.manual_seed(0)
    module = glow_module(n_bins=17, **TINY)
    x, _ = batch({})
    params = list(module.parameters())
    context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with context:
        module.losses(x, None)[0].backward()  # ActNorm's initialisation
    module.model.compile_steps()
    with context:
        module.losses(x, None)[0].backward()  # the eager steps before a capture compile the steps
    graphs_per_pass = []

    def losses(x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        before = counters["stats"]["unique_graphs"]
        out = module.losses(x, y)
        graphs_per_pass.append(counters["stats"]["unique_graphs"] - before)
        return out

    with context:
        graph = CapturedStep(losses, params, x, None, backend="emulated")
        graph.replay(x, None)
    assert len(graphs_per_pass) == 4  # two warm-up passes, the recorded one, a replay
    assert graphs_per_pass[0] > 0  # the capture's autocast state is a new one for dynamo ...
    assert graphs_per_pass[2:] == [0, 0]  # ... which the warm-up has compiled for


def _train(cuda_graphs: bool, **trainer_options) -> GlowModule:
    """A few float64 steps of a conditional Glow on 100 images in batches of 16 (the last one ragged)."""
    L.seed_everything(0)
    module = glow_module(n_bins=17, num_classes=3, warmup_steps=3, lr=1e-2, cuda_graphs=cuda_graphs, **TINY)
    module.capture_backend = "emulated"
    images = torch.rand(100, *TINY["image_shape"], dtype=torch.float64) - 0.5
    data = DataLoader(TensorDataset(images, torch.arange(100) % 3), batch_size=16)
    trainer = L.Trainer(
        accelerator="cpu",
        precision="64-true",
        max_steps=9,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_options,
    )
    trainer.fit(module, train_dataloaders=data)
    return module


def test_cuda_graph_training_matches_eager_training(caplog) -> None:
    with caplog.at_level(logging.INFO):
        eager = _train(False, gradient_clip_val=0.5)
        captured = _train(True, gradient_clip_val=0.5)
    assert captured._graph is not None and captured._graph.static_x.shape[0] == 16
    for (name, a), b in zip(eager.named_parameters(), captured.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
    messages = caplog.text
    assert "training step captured for batches of shape (16, 1, 8, 8)" in messages
    assert "a batch of shape (4, 1, 8, 8) runs eagerly" in messages  # the ragged last batch


def test_throughput_counts_the_flops_of_an_eager_step_under_cuda_graphs() -> None:
    """The first batch, counted for MFU, runs eagerly whether or not later ones replay a capture,
    and its count is the plain forward and backward pass's (its ActNorm initialisation adds none)."""
    counted = {}
    for cuda_graphs in (False, True):
        throughput = Throughput(window=2)
        module = _train(cuda_graphs, callbacks=[throughput])
        assert (module._graph is not None) == cuda_graphs
        counted[cuda_graphs] = throughput.flops_per_image
    x = torch.rand(16, *TINY["image_shape"], dtype=torch.float64) - 0.5
    with FlopCounterMode(display=False) as flops:
        module.losses(x, torch.arange(16) % 3)[0].backward()
    assert counted[False] == counted[True] == flops.get_total_flops() / 16 > 0  # steady state: ActNorm initialised


class FailingCapture(CapturedStep):
    """Runs a capture's passes, then fails as a CUDA capture does on an operator it cannot record."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nthe rest of it")


def test_a_failed_capture_leaves_the_run_training_eagerly(caplog, monkeypatch) -> None:
    monkeypatch.setattr(training_module, "CapturedStep", FailingCapture)
    with caplog.at_level(logging.INFO):
        eager = _train(False, gradient_clip_val=0.5)
        failed = _train(True, gradient_clip_val=0.5)
    assert failed._graph is None
    for (name, a), b in zip(eager.named_parameters(), failed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
    reason = "cuda_graphs: training runs eagerly: the capture failed (CUDA error: operation not permitted when"
    assert caplog.text.count(reason) == 1  # said once, tried once


def test_cuda_graphs_say_why_they_are_not_used(caplog) -> None:
    with caplog.at_level(logging.INFO):
        module = _train(True, accumulate_grad_batches=2)
    assert module._graph is None
    assert "cuda_graphs: training runs eagerly: accumulate_grad_batches=2" in caplog.text
    caplog.clear()
    L.seed_everything(0)
    on_cpu = glow_module(n_bins=17, cuda_graphs=True, **TINY)  # the real backend, on a CPU
    data = DataLoader(TensorDataset(torch.rand(32, *TINY["image_shape"]) - 0.5, torch.zeros(32)), batch_size=16)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False)
    with caplog.at_level(logging.INFO):
        trainer.fit(on_cpu, train_dataloaders=data)
    assert "it needs a CUDA device and this run is on cpu" in caplog.text
    assert on_cpu._graph is None


class DefaultClipping(GlowModule):
    """Lightning's own gradient clipping, to check glowlab's one-pass version against."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        L.LightningModule.configure_gradient_clipping(self, optimizer, gradient_clip_val, gradient_clip_algorithm)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_one_pass_clipping_clips_as_lightning_does(algorithm: str) -> None:
    modules = []
    for cls in (GlowModule, DefaultClipping):
        L.seed_everything(0)
        module = cls(MultiscaleConfig(n_bins=17, **TINY), lr=1e-2, warmup_steps=0)
        data = DataLoader(TensorDataset(torch.rand(64, *TINY["image_shape"], dtype=torch.float64) - 0.5), batch_size=16)
        trainer = L.Trainer(
            accelerator="cpu",
            precision="64-true",
            max_steps=4,
            log_every_n_steps=1,  # per-step values are logged on the steps the loggers write
            gradient_clip_val=0.05,
            gradient_clip_algorithm=algorithm,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, train_dataloaders=data)
        modules.append((module, trainer))
    (ours, trainer), (lightnings, _) = modules
    for a, b in zip(ours.parameters(), lightnings.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(trainer.logged_metrics["grad_norm"])
