"""Variational dequantization (the bound, the noise flow, training) and the weight average (EMA)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from datasets import prepared_digits
from helpers import glow_module, per_example_slogdet, perturb, working_directory

import glowlab
from glowlab.cli import main
from glowlab.flows.dequantization import VariationalDequantizer
from glowlab.likelihood import bits_per_dim, variational_bits_per_dim
from glowlab.models import Glow
from glowlab.training import GlowCheckpoint, GlowModule, ShardDataModule
from glowlab.training.module import WeightAverage


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    return prepared_digits(tmp_path_factory.mktemp("digits"), shard_size=400)


def test_variational_bits_per_dim_by_hand() -> None:
    # D = 2, n_bins = 4, log p = 1 nat, log q = 0.5 nat: (-1 + 0.5 + 2 ln 4) / (2 ln 2) = 1.6393...
    value = variational_bits_per_dim(torch.tensor([1.0]), torch.tensor([0.5]), 2, 4)
    assert value.item() == pytest.approx((-0.5 + 2 * math.log(4)) / (2 * math.log(2)), abs=1e-6)
    assert value.item() == pytest.approx(1.6393262, abs=1e-6)
    # Uniform noise (log q = 0) is the plain formula.
    assert variational_bits_per_dim(torch.tensor([1.0]), torch.tensor([0.0]), 2, 4) == bits_per_dim(
        torch.tensor([1.0]), 2, 4
    )
    # One dimension, two bins. p is 1.5 on [-0.5, -0.25), 0.5 on [-0.25, 0), 1 on [0, 0.5): P(k=0) = 1/2.
    # Uniform noise gives E[log p] - ln 2, a loose bound: 1.1462 bits instead of -log2 P(k) = 1 bit.
    uniform = 0.5 * bits_per_dim(torch.tensor([math.log(1.5)]), 1, 2) + 0.5 * bits_per_dim(
        torch.tensor([math.log(0.5)]), 1, 2
    )
    assert uniform.item() == pytest.approx(1 - 0.5 * math.log2(1.5) - 0.5 * math.log2(0.5), abs=1e-6)
    assert uniform.item() > 1.0
    # The best q is p within the bin, rescaled to the unit bin: q(u) = p(x) / (n_bins P(k)), and
    # the bound becomes exact for every draw of u.
    for p in (1.5, 0.5):
        q = p / (2 * 0.5)
        exact = variational_bits_per_dim(torch.tensor([math.log(p)]), torch.tensor([math.log(q)]), 1, 2)
        assert exact.item() == pytest.approx(1.0, abs=1e-6)


def test_the_noise_flow_starts_as_uniform_noise() -> None:
    torch.manual_seed(0)
    q = VariationalDequantizer((1, 4, 4), 17, steps=2, channels=8).double()
    levels = torch.randint(0, 17, (3, 1, 4, 4))
    noise = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 0.98 + 0.01
    u, log_q = q(noise, levels)
    torch.testing.assert_close(u, noise, atol=1e-12, rtol=0)
    torch.testing.assert_close(log_q, torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)


def test_the_noise_flow_log_density_is_its_change_of_variables() -> None:
    # The base noise u0 is uniform (density 1), so log q(u) = -log|det du/du0|: check by brute force.
    torch.manual_seed(0)
    q = perturb(VariationalDequantizer((2, 4, 4), 5, steps=3, channels=6).double(), scale=0.1)
    levels = torch.randint(0, 5, (2, 2, 4, 4))
    noise = torch.rand(2, 2, 4, 4, dtype=torch.float64) * 0.9 + 0.05
    u, log_q = q(noise, levels)
    assert bool(((u > 0) & (u < 1)).all())  # u stays inside the bin
    assert u.sub(noise).abs().max() > 1e-2  # the perturbed flow really moves the noise
    logdet = per_example_slogdet(lambda n: q(n, levels)[0], noise)
    torch.testing.assert_close(log_q, -logdet, atol=1e-9, rtol=1e-9)


def test_variational_model_dequantizes_within_each_bin_and_adds_log_q() -> None:
    torch.manual_seed(0)
    model = Glow(image_shape=(1, 8, 8), n_bins=17, levels=2, steps=1, hidden_channels=8, dequantization="variational")
    perturb(model.dequantizer, scale=0.05)
    levels = torch.randint(0, 17, (4, 1, 8, 8))
    noise = torch.rand(4, 1, 8, 8)
    x, log_q = model.dequantize(levels, noise)
    # The learned noise never leaves the bin (up to float32 rounding at its edges).
    low, high = levels / 17 - 0.5, (levels + 1) / 17 - 0.5
    assert bool(((x >= low - 1e-7) & (x <= high)).all())
    assert 0.05 < float((x - (levels + noise) / 17 + 0.5).abs().max()) * 17 < 1  # and it moves
    with torch.no_grad():
        torch.testing.assert_close(model.log_bound(levels, noise), model.log_prob(x) - log_q)
    # The pipeline's uniformly dequantized images give the same result through redequantize.
    x_uniform = (levels + noise) / 17 - 0.5
    x2, log_q2 = model.redequantize(x_uniform, levels)
    torch.testing.assert_close(x2, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(log_q2, log_q, atol=1e-3, rtol=1e-4)
    # A uniform model: log q = 0 and the images untouched.
    plain = Glow(image_shape=(1, 8, 8), n_bins=17, levels=2, steps=1, hidden_channels=8)
    assert plain.dequantizer is None
    same, zero = plain.redequantize(x_uniform, levels)
    assert same is x_uniform and not zero.any()


def test_weight_average_update_is_the_exponential_average() -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    average = WeightAverage(net, decay=0.99)
    average.update(net)  # the first update copies the weights whole
    torch.testing.assert_close(average.model.weight, net.weight)
    before = average.model.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    average.update(net)  # second update: decay min(0.99, 2 / 11)
    decay = 2 / 11
    torch.testing.assert_close(average.model.weight, decay * before + (1 - decay) * net.weight)
    assert not average.model.weight.requires_grad
    for _ in range(2000):
        average.update(net)  # decay reaches 0.99; the average converges to fixed weights
    torch.testing.assert_close(average.model.weight, net.weight)


def test_ema_variational_run_evaluates_samples_and_loads_the_average(digits_root: Path, tmp_path: Path) -> None:
    data = ShardDataModule(root=str(digits_root), batch_size=32, eval_batch_size=512)
    module = glow_module(
        image_shape=(1, 8, 8),
        n_bins=17,
        levels=2,
        steps=2,
        hidden_channels=16,
        warmup_steps=5,
        lr=2e-3,
        ema_decay=0.9,
        dequantization="variational",
        dequantization_steps=2,
        dequantization_channels=8,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=30,
        limit_val_batches=1,
        check_val_every_n_epoch=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[GlowCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=0, save_last=True)],
    )
    trainer.fit(module, datamodule=data)
    # Only the trained model's parameters are optimised, the dequantizer's among them.
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.model.parameters()}
    assert module.model.dequantizer.features[0].weight.grad is not None
    tested = trainer.test(module, datamodule=data, verbose=False)[0]["test_bpd"]
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    average, trained = glowlab.load(ckpt), glowlab.load(ckpt, weights="trained")
    assert (average.weights, trained.weights) == ("ema", "trained")
    for a, b in zip(average.state_dict().values(), module.ema.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(average.parameters(), trained.parameters(), strict=True))
    # `evaluate bpd` loads the average, as the test loop used it: one draw gives the same figure.
    out = tmp_path / "bpd.json"
    main(["evaluate", "bpd", "--ckpt", str(ckpt), "--data", str(digits_root), "--draws", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["bpd"] == pytest.approx(tested, abs=1e-5)
    assert (result["weights"], result["dequantization"]) == ("ema", "variational")
    trained_out = tmp_path / "trained.json"
    args = ["evaluate", "bpd", "--ckpt", str(ckpt), "--data", str(digits_root), "--draws", "1"]
    main([*args, "--weights", "trained", "--out", str(trained_out)])
    assert json.loads(trained_out.read_text())["weights"] == "trained"
    assert json.loads(trained_out.read_text())["bpd"] != pytest.approx(tested, abs=1e-4)
    # Exported folders keep the weights they were given and say which.
    with working_directory(tmp_path):
        main(["export", str(ckpt), "exported"])
    info = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert info["weights"] == "ema" and "moving average" in (tmp_path / "exported" / "README.md").read_text()
    assert glowlab.load(tmp_path / "exported").weights == "ema"


def test_weights_choice_errors_name_the_cause(tmp_path: Path) -> None:
    module = glow_module(image_shape=(1, 8, 8), n_bins=17, levels=2, steps=1, hidden_channels=8)
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()}}
    checkpoint["hyper_parameters"] = dict(module.hparams)
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    assert glowlab.load(tmp_path / "plain.ckpt").weights == "trained"
    with pytest.raises(ValueError, match=r"plain.ckpt: --weights ema, but this run kept no weight average"):
        glowlab.load(tmp_path / "plain.ckpt", weights="ema")
    with pytest.raises(ValueError, match=r"model.ema_decay=1.0 must be in \(0, 1\)"):
        GlowModule(ema_decay=1.0)
    with pytest.raises(ValueError, match="dequantization='gaussian'"):
        Glow(image_shape=(1, 8, 8), n_bins=17, levels=2, steps=1, dequantization="gaussian")
