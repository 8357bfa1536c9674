"""Model FLOPs utilisation: the GPU peaks, the step's FLOPs counted by hand, and what Throughput logs."""

from __future__ import annotations

import io
import logging

import lightning as L
import pytest
import torch
from helpers import glow_module, quiet_trainer
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from glowlab.flops import StepFlops, device_peak_tflops, known_gpu, precision_kind
from glowlab.training import Throughput
from glowlab.training.progress import RunProgress

D, BATCH = 32, 8
# One bias-free linear layer on inputs that need no gradient: the forward product is 2·D² FLOPs an
# image and the backward pass computes the weight's gradient alone, another 2·D².
FLOPS_PER_IMAGE = 4 * D * D


class Linear(L.LightningModule):
    def __init__(self, skip_first: bool = False, compiled: bool = False, skip_second: bool = False) -> None:
        super().__init__()
        self.layer = nn.Linear(D, D, bias=False)
        self.skip_first = skip_first
        self.skip_second = skip_second
        self.compiled = torch.compile(self.layer.forward) if compiled else None

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if (self.skip_first and batch_idx == 0) or (self.skip_second and batch_idx == 1):
            return None  # no backward pass this batch
        run = self.compiled or self.layer
        return run(batch[0]).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def fit(module: L.LightningModule, throughput: Throughput, steps: int = 8, **trainer_options) -> dict[str, float]:
    data = DataLoader(TensorDataset(torch.randn(steps * BATCH, D)), batch_size=BATCH)
    callbacks = [throughput, *trainer_options.pop("callbacks", [])]
    trainer = quiet_trainer(max_steps=steps, callbacks=callbacks, **trainer_options)
    trainer.fit(module, train_dataloaders=data)
    return {k: float(v) for k, v in trainer.logged_metrics.items()}


@pytest.mark.parametrize(
    ("precision", "kind"),
    [
        ("bf16-mixed", "bf16"),
        ("bf16-true", "bf16"),
        ("16-mixed", "16"),
        ("32-true", "32"),
        ("32", "32"),
        ("64-true", None),
    ],
)
def test_precision_kind(precision: str, kind: str | None) -> None:
    assert precision_kind(precision) == kind


def test_device_peak_is_the_known_gpus_at_the_runs_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert known_gpu("NVIDIA H100 80GB HBM3") == known_gpu("H100")
    assert device_peak_tflops("cuda", "bf16-mixed") == 989.4
    assert device_peak_tflops("cuda", "16-mixed") == 989.4
    assert device_peak_tflops("cuda", "32-true") == 494.7  # TF32, cuDNN's default for convolutions
    assert device_peak_tflops("cuda", "64-true") is None
    assert device_peak_tflops("cpu", "bf16-mixed") is None
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert device_peak_tflops("cuda", "32-true") is None  # plain float32: no tensor-core peak listed
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    assert device_peak_tflops("cuda", "bf16-mixed") is None


def test_step_flops_counts_a_forward_and_backward_pass_by_hand() -> None:
    layer = nn.Linear(D, D, bias=False)
    flops = StepFlops()
    flops.start()
    assert flops.counting
    layer(torch.randn(BATCH, D)).sum().backward()
    assert flops.stop() == BATCH * FLOPS_PER_IMAGE
    assert not flops.counting and flops.total == BATCH * FLOPS_PER_IMAGE


def test_step_flops_count_invertible_backprop_and_its_recomputation() -> None:
    """Invertible backprop calls autograd.grad inside its backward pass, which FlopCounterMode's
    module hooks cannot take; the count goes through, larger by the recomputed activations."""
    x = torch.rand(8, 1, 8, 8) - 0.5
    counted = {}
    for backprop in ("standard", "invertible"):
        torch.manual_seed(0)
        module = glow_module(image_shape=(1, 8, 8), n_bins=17, levels=2, steps=2, hidden_channels=8, backprop=backprop)
        module.losses(x, None)  # ActNorm initialisation
        flops = StepFlops()
        flops.start()
        module.losses(x, None)[0].backward()
        counted[backprop] = flops.stop()
        if backprop == "standard":
            with FlopCounterMode(display=False) as reference:
                module.losses(x, None)[0].backward()
            assert counted[backprop] == reference.get_total_flops()
    assert counted["invertible"] > counted["standard"] > 0


def test_throughput_logs_model_tflops_and_mfu(caplog: pytest.LogCaptureFixture) -> None:
    throughput = Throughput(window=2, peak_tflops=1e-6)
    with caplog.at_level(logging.INFO, logger="glowlab"):
        metrics = fit(Linear(), throughput)
    assert throughput.flops_per_image == FLOPS_PER_IMAGE
    per_device = metrics["throughput/images_per_sec_per_device"] * FLOPS_PER_IMAGE / 1e12
    assert metrics["throughput/tflops_per_sec_per_device"] == pytest.approx(per_device, rel=1e-6)
    assert metrics["throughput/mfu"] == pytest.approx(per_device / 1e-6, rel=1e-6)
    assert f"a training step is {FLOPS_PER_IMAGE / 1e9:.4g} GFLOP an image" in caplog.text
    assert "throughput/mfu against 1e-06 TFLOP/s (cpu, precision 32-true)" in caplog.text


def test_progress_lines_show_the_last_mfu() -> None:
    stream = io.StringIO()
    progress = RunProgress(log_seconds=0.0, stream=stream)
    throughput = Throughput(window=2, peak_tflops=1e-6)
    fit(Linear(), throughput, callbacks=[progress], enable_progress_bar=True)
    last = [line for line in stream.getvalue().splitlines() if line.startswith("step ")][-1]
    assert last.startswith("step 8/8") and last.endswith(f"img/s, MFU {throughput.mfu:.1%}")


def test_throughput_without_a_known_peak_logs_no_mfu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="glowlab"):
        metrics = fit(Linear(), Throughput(window=2))
    assert "throughput/tflops_per_sec_per_device" in metrics and "throughput/mfu" not in metrics
    assert "no throughput/mfu: no dense peak known for cpu at precision 32-true" in caplog.text


def test_throughput_counts_the_next_batch_when_the_first_has_no_backward_pass(caplog: pytest.LogCaptureFixture) -> None:
    throughput = Throughput(window=2)
    with caplog.at_level(logging.INFO, logger="glowlab"):
        fit(Linear(skip_first=True, skip_second=True), throughput)
    assert throughput.flops_per_image == FLOPS_PER_IMAGE and not throughput._flops.counting
    assert "(forward and backward, counted on training batch 3)" in caplog.text


def test_throughput_counts_a_compiled_model_eagerly_and_leaves_it_compiled() -> None:
    torch._dynamo.reset()
    counters.clear()
    throughput = Throughput(window=2)
    fit(Linear(compiled=True), throughput)
    assert throughput.flops_per_image == FLOPS_PER_IMAGE
    assert counters["stats"]["unique_graphs"] == 1  # compiled after the counted batch, once


def test_throughput_refuses_a_window_or_peak_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match=r"Throughput\(peak_tflops=0\)"):
        Throughput(peak_tflops=0)
    for window in (0, -3, 2.5):
        with pytest.raises(ValueError, match=rf"Throughput\(window={window}\): give a number of optimizer steps"):
            Throughput(window=window)
