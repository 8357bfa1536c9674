"""Lightning layer and CLI: configs, the digits main job end to end, test/validate/sample commands."""

from __future__ import annotations

import csv
import functools
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from datasets import prepared, prepared_digits
from helpers import glow_module, quiet_trainer, working_directory
from PIL import Image
from torch._dynamo.utils import counters

from glowlab.cli import main
from glowlab.jobs.classifier import train_classifier
from glowlab.models import Glow, MultiscaleConfig, image_flow
from glowlab.training import GlowModule, SampleGrid, ShardDataModule, Throughput
from glowlab.training.cli import GlowCLI
from glowlab.training.module import EpochMeans

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
# Image shapes of the data sets the paper configs expect; the tests stand in small prepared sets.
PAPER_SHAPES = {
    "cifar10": (3, 32, 32),
    "imagenet32": (3, 32, 32),
    "imagenet64": (3, 64, 64),
    "celebahq256": (3, 256, 256),
}


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    return prepared_digits(tmp_path_factory.mktemp("digits"), shard_size=400)


def data_root_for(config: Path, tmp_path: Path, digits_root: Path) -> Path:
    # digits-nice, cifar10-realnvp, ...: the data set is the name before the model.
    data = config.stem.split("-")[0]
    if data == "digits":
        return digits_root
    return prepared(tmp_path / config.stem, n=10, shape=PAPER_SHAPES[data], shard_size=4)


def test_there_are_configs() -> None:
    assert {p.stem for p in CONFIGS} >= {"digits", "cifar10", "celebahq256", "imagenet32", "imagenet64"}
    assert {p.stem for p in CONFIGS} >= {"digits-nice", "digits-realnvp", "cifar10-realnvp"}


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_instantiates(config: Path, tmp_path, monkeypatch, digits_root) -> None:
    monkeypatch.chdir(tmp_path)
    root = str(data_root_for(config, tmp_path, digits_root))
    cli = GlowCLI(GlowModule, ShardDataModule, args=["--config", str(config), "--data.root", root, *QUIET], run=False)
    model, data = cli.model, cli.datamodule
    assert model.model.image_shape == data.image_shape
    assert model.model.n_bins == data.n_bins
    assert isinstance(cli.trainer, L.Trainer) and cli.trainer.checkpoint_callback.monitor == "val_bpd"
    assert any(isinstance(c, SampleGrid) for c in cli.trainer.callbacks)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_paper_configs_match_the_paper(tmp_path, monkeypatch, digits_root) -> None:
    monkeypatch.chdir(tmp_path)
    expected = {
        "cifar10": (3, 32, "affine", (3, 32, 32), 256),
        "imagenet32": (3, 48, "affine", (3, 32, 32), 256),
        "imagenet64": (4, 48, "affine", (3, 64, 64), 256),
        "celebahq256": (6, 32, "additive", (3, 256, 256), 32),
    }
    for name, (levels, steps, coupling, shape, n_bins) in expected.items():
        path = next(p for p in CONFIGS if p.stem == name)
        root = str(data_root_for(path, tmp_path, digits_root))
        args = ["--config", str(path), "--data.root", root]
        hp = GlowCLI(GlowModule, ShardDataModule, args=args, run=False).model.model.config
        assert (hp.levels, hp.steps, hp.coupling, tuple(hp.image_shape), hp.n_bins) == (
            levels,
            steps,
            coupling,
            shape,
            n_bins,
        )
        assert hp.hidden_channels == 512 and hp.permutation == "lu"


def _val_bpd(module: GlowModule, data: ShardDataModule) -> float:
    trainer = quiet_trainer(enable_checkpointing=True)
    return trainer.validate(module, datamodule=data, verbose=False)[0]["val_bpd"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits_root) -> Path:
    """A short run of the digits main job through the CLI, as a user would start it."""
    root = tmp_path_factory.mktemp("run")
    config = next(p for p in CONFIGS if p.stem == "digits")
    with working_directory(root):
        main(["fit", "--config", str(config), "--trainer.max_steps", "200", "--data.root", str(digits_root), *QUIET])
    return root / "runs" / "digits" / "version_0"


def test_fit_on_digits_writes_checkpoints_samples_and_test_bpd(digits_run: Path) -> None:
    assert (digits_run / "checkpoints" / "best.ckpt").is_file()
    assert (digits_run / "checkpoints" / "last.ckpt").is_file()
    assert (digits_run / "config.yaml").is_file()
    for name in ("best.png", "last.png"):  # the tested weights and the final ones
        grid = Image.open(digits_run / "samples" / name)
        # 6 temperatures x 10 samples of 8x8 digits enlarged to 32x32, 2-pixel padding, row labels on the left.
        assert grid.size[1] == 6 * 34 + 2 and grid.size[0] > 10 * 34 + 2
    results = json.loads((digits_run / "test_results.json").read_text())
    assert results["num_test_images"] == 359 and math.log2(17) > results["test_bpd"] > 0
    last = torch.load(digits_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 200


def test_fit_lowers_val_bpd_below_the_untrained_model(digits_run: Path, digits_root: Path) -> None:
    data = ShardDataModule(root=str(digits_root), eval_batch_size=512)
    trained = GlowModule.load_from_checkpoint(digits_run / "checkpoints" / "best.ckpt")
    torch.manual_seed(0)
    untrained = GlowModule(**{k: v for k, v in trained.hparams.items() if k != "_instantiator"})
    with torch.no_grad():  # the data-dependent ActNorm init that training starts from
        untrained.model.train().evaluate(data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)[0])
    before, after = _val_bpd(untrained, data), _val_bpd(trained, data)
    assert after < before - 0.5, (before, after)


def test_test_and_validate_subcommands(digits_run: Path, digits_root: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = str(next(p for p in CONFIGS if p.stem == "digits"))
    ckpt = str(digits_run / "checkpoints" / "best.ckpt")
    common = ["--config", config, "--ckpt_path", ckpt, "--data.root", str(digits_root), *QUIET]
    main(["test", *common])
    # A checkpoint of a run folder: the evaluation logs into that run (RUN/test-best/), no new version_N.
    tested = json.loads((digits_run / "test-best" / "test_results.json").read_text())
    fitted = json.loads((digits_run / "test_results.json").read_text())
    assert tested["checkpoint"] == ckpt
    # The same checkpoint, images and (per-sample, seeded) dequantization noise: the same number.
    assert tested["test_bpd"] == pytest.approx(fitted["test_bpd"], abs=1e-6)
    main(["validate", *common])
    assert (digits_run / "validate-best" / "metrics.csv").is_file()
    assert not (tmp_path / "runs" / "digits").exists()


def test_sample_command_writes_a_grid(digits_run: Path, tmp_path) -> None:
    out = tmp_path / "grid.png"
    main(
        [
            "sample",
            "--ckpt",
            str(digits_run / "checkpoints" / "last.ckpt"),
            "--num-samples",
            "16",
            "--temperature",
            "0.7",
            "--out",
            str(out),
        ]
    )
    assert Image.open(out).size[1] == 4 * 34 + 2
    sweep = tmp_path / "sweep.png"
    main(
        [
            "sample",
            "--ckpt",
            str(digits_run / "checkpoints" / "last.ckpt"),
            "--num-samples",
            "5",
            "--temperature",
            "0",
            "0.5",
            "1",
            "--out",
            str(sweep),
        ]
    )
    assert Image.open(sweep).size[1] == 3 * 34 + 2
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(tmp_path / "missing.ckpt")])


def test_console_script_help() -> None:
    out = subprocess.run([sys.executable, "-m", "glowlab", "--help"], capture_output=True, text=True, check=True).stdout
    assert "fit" in out and "sample" in out
    out = subprocess.run(
        [sys.executable, "-m", "glowlab", "sample", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--temperature" in out


def test_class_conditional_training_step_logs_class_loss(digits_root: Path) -> None:
    data = ShardDataModule(root=str(digits_root), batch_size=32)
    module = glow_module(
        image_shape=(1, 8, 8), n_bins=17, levels=2, steps=2, hidden_channels=16, num_classes=10, warmup_steps=10
    )
    trainer = quiet_trainer(
        max_epochs=1, limit_train_batches=4, limit_val_batches=1, log_every_n_steps=2, callbacks=[Throughput(window=2)]
    )
    trainer.fit(module, datamodule=data)
    metrics = trainer.logged_metrics
    assert {"train_bpd_step", "train_class_bits_step", "grad_norm", "val_bpd", "val_class_acc"} <= set(metrics)
    assert metrics["throughput/images_per_sec"] > 0 and metrics["throughput/images_per_sec_per_device"] > 0
    assert torch.isfinite(metrics["grad_norm"])


def test_throughput_leaves_validation_out_of_its_window(digits_root: Path) -> None:
    class SlowValidation(L.Callback):
        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            time.sleep(2.0)

    module = glow_module(image_shape=(1, 8, 8), n_bins=17, levels=1, steps=1, hidden_channels=4)
    # 4 steps an epoch, validation after each: the first window (the clock starts at the end of the
    # first batch) spans steps 1-3, the 2 s validation and the next epoch's first step.
    trainer = quiet_trainer(
        max_epochs=2, limit_train_batches=4, limit_val_batches=1, callbacks=[Throughput(window=4), SlowValidation()]
    )
    trainer.fit(module, datamodule=ShardDataModule(root=str(digits_root), batch_size=32))
    rate = float(trainer.callback_metrics["throughput/images_per_sec"])
    assert rate > 4 * 32 / 1.0  # 4 batches of 32 in under a second: the 2 s are not in the window


@pytest.mark.parametrize("backprop", ["standard", "invertible"])
def test_compiled_steps_match_eager(backprop: str) -> None:
    torch.manual_seed(0)
    kwargs = dict(image_shape=(1, 8, 8), levels=2, steps=2, hidden_channels=16, backprop=backprop)
    compiled, eager = Glow(**kwargs).double(), Glow(**kwargs).double()
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64) - 0.5
    compiled.log_prob(x)  # ActNorm initialisation, so both passes below see the same weights
    eager.load_state_dict(compiled.state_dict())
    torch._dynamo.reset()  # other tests' entries count towards the compiled step's recompile limit
    counters.clear()
    compiled.compile_steps()
    results = []
    for model in (eager, compiled):
        log_prob = model.log_prob(x)
        results.append((log_prob, torch.autograd.grad(log_prob.mean(), list(model.parameters()))))
    (eager_lp, eager_grads), (compiled_lp, compiled_grads) = results
    torch.testing.assert_close(compiled_lp, eager_lp, rtol=1e-10, atol=1e-10)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-8, atol=1e-10)
    assert any(g.abs().max() > 0 for g in eager_grads)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    # The steps really ran compiled: a few graphs, one per step shape, shared by the steps.
    assert 1 <= counters["stats"]["unique_graphs"] <= 4


@pytest.mark.parametrize("architecture", ["glow", "realnvp", "nice", "transformer"])
def test_compiled_steps_stay_compiled_through_every_pass_of_a_run(
    architecture: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regionally compiled layers share one code object, and dynamo counts its graphs against one
    recompile limit: a three-level model's training, capture, validation and ragged-batch passes
    need more than dynamo's default 8, and the passes after it used to run eagerly."""
    # Graphs and guards are dynamo's; the eager backend keeps the C++ compiler out of the test.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        graphs = compiled_graphs_per_pass(architecture)
    assert graphs[1] == graphs[0] > 0
    assert graphs[1] < graphs[2] < graphs[3] < graphs[4]  # each new pass compiled its own graphs


def compiled_graphs_per_pass(architecture: str) -> list[int]:
    """dynamo graphs compiled so far after each pass of a run: two training passes, one in a
    capture's autocast state, validation and a ragged validation batch."""
    torch.manual_seed(0)
    if architecture == "transformer":
        config = MultiscaleConfig(
            image_shape=(2, 4, 4), architecture="transformer", steps=4, hidden_channels=8, heads=2, layers_per_block=1
        )
    else:
        config = MultiscaleConfig(
            image_shape=(2, 16, 16), architecture=architecture, levels=3, steps=2, hidden_channels=8
        )
    model = image_flow(config)
    x = torch.rand(8, *config.image_shape) - 0.5
    model.log_prob(x)  # ActNorm initialisation
    torch._dynamo.reset()
    counters.clear()
    model.compile_steps()
    graphs = []

    def graphs_after(pass_: Callable[[], object]) -> None:
        pass_()
        graphs.append(counters["stats"]["unique_graphs"])

    graphs_after(lambda: model.log_prob(x).mean().backward())
    graphs_after(lambda: model.log_prob(x).mean().backward())  # compiled graphs reused
    with torch.autocast("cpu", enabled=False, cache_enabled=False):  # a CUDA-graph capture's state
        graphs_after(lambda: model.log_prob(x).mean().backward())
    model.eval()
    with torch.no_grad():
        graphs_after(lambda: model.log_prob(x))
        graphs_after(lambda: model.log_prob(x[:5]))  # a ragged last batch
    return graphs


def test_per_step_values_are_logged_on_the_steps_the_loggers_write(digits_root: Path, tmp_path: Path) -> None:
    """Each ``self.log`` costs Lightning host time: per-step values are logged on the steps whose
    metrics Lightning writes, the epoch mean once at the epoch's end, and the written rows are complete."""
    module = glow_module(image_shape=(1, 8, 8), n_bins=17, levels=2, steps=1, hidden_channels=8)
    calls: list[tuple[int, str]] = []
    log = module.log
    module.log = lambda name, *args, **kwargs: calls.append((module.global_step, name)) or log(name, *args, **kwargs)
    trainer = quiet_trainer(
        max_steps=7,
        log_every_n_steps=3,
        limit_train_batches=5,
        limit_val_batches=0,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
    )
    trainer.fit(module, datamodule=ShardDataModule(root=str(digits_root), batch_size=32))
    for name in ("train_loss", "grad_norm", "nonfinite_steps", "train_bpd_step"):
        assert [step for step, logged in calls if logged == name] == [2, 5], name
    # Ends of epoch 0 (5 batches) and of the 2 batches of epoch 1 that reach max_steps.
    assert [step for step, logged in calls if logged == "train_bpd_epoch"] == [5, 7]
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    written = [row for row in rows if row["grad_norm"]]
    assert [int(row["step"]) for row in written] == [2, 5]
    assert all(row["train_loss"] and row["nonfinite_steps"] and row["train_bpd_step"] for row in written)
    assert [int(row["step"]) for row in rows if row["train_bpd_epoch"]] == [4, 6]  # Lightning writes the last step


def test_epoch_mean_is_the_mean_over_the_epochs_batches(digits_root: Path) -> None:
    """``train_bpd_epoch`` (summed on the device, logged once) is the mean of the epoch's batches'
    bits/dim, each weighted by its size as Lightning's ``on_epoch`` mean weights it."""
    module = glow_module(image_shape=(1, 8, 8), n_bins=17, levels=2, steps=1, hidden_channels=8)
    seen: list[tuple[float, int]] = []
    add = module.epoch_means.add
    module.epoch_means.add = lambda means, n, epoch: seen.append((float(means["train_bpd"]), n)) or add(means, n, epoch)
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0)
    trainer.fit(module, datamodule=ShardDataModule(root=str(digits_root), batch_size=400))
    assert [n for _, n in seen] == [400] * 6  # 3 full batches of the 1258 training images an epoch
    last_epoch = seen[3:]
    expected = sum(v * n for v, n in last_epoch) / sum(n for _, n in last_epoch)
    assert float(trainer.logged_metrics["train_bpd_epoch"]) == pytest.approx(expected, rel=1e-6)
    assert module.epoch_means.count == 1200 and module.epoch_means.epoch == 1  # the second epoch's alone


def test_epoch_means_over_processes_count_every_batch_once_across_a_resume() -> None:
    """Under DDP the mean is over every process's batches, and a checkpoint's sums (of all
    processes) are restored on one process only, so a resumed epoch counts them once. Two
    processes simulated: process 0's ``reduce`` adds what process 1 holds."""

    def batch(value: float) -> dict[str, torch.Tensor]:
        return {"train_bpd": torch.tensor(value)}

    first, second = EpochMeans(), EpochMeans()
    first.add(batch(1.0), 4, epoch=3)
    second.add(batch(2.0), 4, epoch=3)
    second.add(batch(5.0), 2, epoch=3)
    held: dict[str, torch.Tensor] = {}
    second.state_dict(lambda totals: held.setdefault("second", totals.clone()))  # process 1's part of the collective
    saved = first.state_dict(lambda totals: totals + held["second"])
    assert saved == {"sums": {"train_bpd": 4.0 + 8.0 + 10.0}, "count": 10, "epoch": 3}
    assert first.means() == {"train_bpd": 1.0}  # one process's own mean, without the sum over processes

    resumed = [EpochMeans(), EpochMeans()]
    resumed[0].load_state_dict(saved, keep=True)
    resumed[1].load_state_dict(saved, keep=False)
    assert resumed[1].sums == {"train_bpd": 0.0} and resumed[1].count == 0 and resumed[1].epoch == 3
    resumed[0].add(batch(3.0), 4, epoch=3)
    resumed[1].add(batch(4.0), 4, epoch=3)
    resumed[1].means(lambda totals: held.__setitem__("second", totals.clone()) or totals)
    means = resumed[0].means(lambda totals: totals + held["second"])
    assert means["train_bpd"].item() == pytest.approx((22.0 + 12.0 + 16.0) / 18)
    resumed[0].add(batch(7.0), 4, epoch=4)  # another epoch starts afresh
    assert resumed[0].means() == {"train_bpd": 7.0}


def test_compiled_training_run_writes_a_plain_checkpoint(digits_root: Path, tmp_path: Path) -> None:
    module = glow_module(image_shape=(1, 8, 8), n_bins=17, levels=2, steps=2, hidden_channels=16, compile=True)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=1, default_root_dir=tmp_path, enable_checkpointing=True)
    data = ShardDataModule(root=str(digits_root), batch_size=32)
    trainer.fit(module, datamodule=data)
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    assert math.isfinite(metrics["val_bpd"])
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    loaded = GlowModule.load_from_checkpoint(checkpoint, compile=False)
    for name, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_conditional_model_rejects_unlabelled_or_out_of_range_data(digits_root: Path) -> None:
    module = glow_module(image_shape=(1, 8, 8), n_bins=17, levels=2, steps=1, hidden_channels=8, num_classes=5)
    trainer = quiet_trainer(max_steps=1)
    with pytest.raises(ValueError, match=r"num_classes=5 but the data has labels up to 9"):
        trainer.fit(module, datamodule=ShardDataModule(root=str(digits_root), batch_size=32))


def test_warmup_is_linear_in_steps() -> None:
    module = glow_module(
        image_shape=(1, 8, 8), n_bins=17, levels=1, steps=1, hidden_channels=4, lr=1e-3, warmup_steps=4
    )
    config = module.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.Adamax)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    with pytest.raises(ValueError, match=r"model.optimizer='sgd'"):
        GlowModule(optimizer="sgd")


@pytest.mark.parametrize(
    ("name", "architecture"),
    [
        ("digits-nice", "nice"),
        ("digits-realnvp", "realnvp"),
        ("digits-transformer", "transformer"),
        ("digits-variational", "glow"),
    ],
)
def test_other_models_train_and_run_every_image_job(name: str, architecture: str, digits_root: Path, tmp_path) -> None:
    config = next(p for p in CONFIGS if p.stem == name)
    with working_directory(tmp_path):
        main(["fit", "--config", str(config), "--trainer.max_steps", "150", "--data.root", str(digits_root), *QUIET])
    run = tmp_path / "runs" / name / "version_0"
    ckpt = str(run / "checkpoints" / "best.ckpt")
    module = GlowModule.load_from_checkpoint(ckpt)
    assert module.model.config.architecture == architecture
    fitted = json.loads((run / "test_results.json").read_text())
    data = ShardDataModule(root=str(digits_root), eval_batch_size=512)
    untrained = GlowModule(**{k: v for k, v in module.hparams.items() if k != "_instantiator"})
    with torch.no_grad():  # the data-dependent ActNorm init that training starts from
        untrained.model.train().evaluate(data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)[0])
    assert _val_bpd(module, data) < _val_bpd(untrained, data) - 0.1, fitted
    bpd = json.loads(
        Path(
            main_json(["evaluate", "bpd", "--ckpt", ckpt, "--data", str(digits_root), "--draws", "1"], tmp_path / "b")
        ).read_text()
    )
    assert bpd["bpd"] == pytest.approx(fitted["test_bpd"], abs=1e-5)
    main(["sample", "--ckpt", ckpt, "--num-samples", "4", "--out", str(tmp_path / "s.png")])
    main(["interpolate", "--ckpt", ckpt, "--data", str(digits_root), "--out", str(tmp_path / "i.png")])
    assert (tmp_path / "s.png").is_file() and (tmp_path / "i.png").is_file()
    main(["score", "--ckpt", ckpt, "--data", str(digits_root), "--out", str(tmp_path / "scores.csv")])
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert [int(r["index"]) for r in rows] == list(range(359))
    assert np.mean([float(r["bits_per_dim"]) for r in rows]) == pytest.approx(fitted["test_bpd"], abs=1e-5)
    if architecture == "transformer":  # FID through the transformer flow's own sampling (cache, bounded scales)
        classifier = tmp_path / "classifier.pt"
        train_classifier(str(digits_root), epochs=1, out=str(classifier))
        fid_args = ["evaluate", "fid", "--ckpt", ckpt, "--data", str(digits_root), "--features", "classifier"]
        fid_args += ["--classifier", str(classifier), "--num-samples", "50", "--cache-dir", str(tmp_path / "cache")]
        fid = json.loads(Path(main_json(fid_args, tmp_path / "fid")).read_text())
        assert math.isfinite(fid["fid"]) and fid["fid"] > 0 and fid["num_samples"] == 50


def main_json(argv: list[str], out: Path) -> Path:
    """Run a JSON-writing job with ``--out`` and return the file."""
    main([*argv, "--out", str(out.with_suffix(".json"))])
    return out.with_suffix(".json")


def test_conditional_transformer_flow_trains_for_guidance_and_samples_with_it(digits_root: Path, tmp_path) -> None:
    data = ShardDataModule(root=str(digits_root), batch_size=32, eval_batch_size=512)
    module = glow_module(
        image_shape=(1, 8, 8),
        n_bins=17,
        architecture="transformer",
        steps=2,
        hidden_channels=16,
        heads=2,
        layers_per_block=1,
        num_classes=10,
        label_dropout=0.5,
        noise_std=0.01,
        warmup_steps=2,
        optimizer="adam",
    )
    dropped = []
    drop_labels = module.model.drop_labels
    module.model.drop_labels = lambda y, generator=None: dropped.append(drop_labels(y, generator)) or dropped[-1]
    trainer = quiet_trainer(max_steps=6, limit_val_batches=1, val_check_interval=3)
    trainer.fit(module, datamodule=data)
    # Training drops about half the labels (to the null label 10); evaluation uses them all.
    assert len(dropped) == 6 and 0.2 < torch.cat(dropped).eq(10).float().mean() < 0.8
    assert "val_bpd" in trainer.logged_metrics and "val_class_acc" not in trainer.logged_metrics
    ckpt = tmp_path / "tarflow.ckpt"
    trainer.save_checkpoint(ckpt)
    out = tmp_path / "guided.png"
    main(
        [
            "sample",
            "--ckpt",
            str(ckpt),
            "--classes",
            "0",
            "1",
            "--guidance",
            "2",
            "--num-samples",
            "3",
            "--out",
            str(out),
        ]
    )
    assert Image.open(out).size[0] > 0
    with pytest.raises(ValueError, match="guidance=2: classifier-free guidance needs a class-conditional transformer"):
        Glow(image_shape=(1, 8, 8), n_bins=17, levels=2, steps=1, hidden_channels=8).decode_samples(
            Glow(image_shape=(1, 8, 8), n_bins=17, levels=2, steps=1).sample_latents(1), None, 2.0
        )
