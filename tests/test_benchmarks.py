"""The benchmark scripts' measuring code: peak-RSS readings, small runs of the scripts, adapters."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from memory import current_rss_mib, live_memory_env, peak_rss_mib, reset_peak_rss  # noqa: E402


def test_peak_rss_counts_a_new_allocation_and_restarts_on_reset() -> None:
    reset_peak_rss()
    base = current_rss_mib()
    block = torch.ones(64 * 2**20)  # 256 MiB, every page written
    assert peak_rss_mib() - base > 240
    del block
    reset_peak_rss()
    assert peak_rss_mib() - current_rss_mib() < 16


def test_step_peak_of_a_worker_ignores_its_parents_memory() -> None:
    # getrusage's ru_maxrss survives exec: a worker started from this (now large) process would
    # report at least this process's RSS. VmHWM is the worker's own.
    ballast = torch.ones(128 * 2**20)  # 512 MiB held by the parent while the worker runs
    cmd = [sys.executable, str(BENCHMARKS / "glow_step.py"), "--memory-worker", "glowlab"]
    out = subprocess.run(
        [*cmd, "--hidden-channels", "8", "--batch", "64"],
        check=True,
        capture_output=True,
        text=True,
        env=live_memory_env(),
    )
    step_peak = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0 < step_peak < 100, step_peak
    assert ballast.sum() > 0


def test_memory_depth_prints_rows_and_ratios() -> None:
    cmd = [sys.executable, str(BENCHMARKS / "memory_depth.py"), "--width", "8", "--batch", "2"]
    out = subprocess.run(
        [*cmd, "--depths", "1", "2", "--steps", "1", "--precision", "bf16"], check=True, capture_output=True, text=True
    ).stdout
    rows = [line for line in out.splitlines() if "s/step" in line]
    assert len(rows) == 4 and all("images/s" in row for row in rows)
    assert "invertible  K=2 / K=1: peak" in out and "time invertible / standard at K=2:" in out
    assert "precision bf16" in out


# A stand-in for rosinality/glow-pytorch's model.py with the interface its adapter uses: the
# coupling width is AffineCoupling's default filter_size, and forward returns (log_p, logdet, z).
STAND_IN = """
import torch
from glowlab.models import Glow as _Glow

class AffineCoupling(torch.nn.Module):
    def __init__(self, in_channel, filter_size=512, affine=True):
        super().__init__()
        self.filter_size = filter_size

class Glow(torch.nn.Module):
    def __init__(self, in_channel, n_flow, n_block, affine=True, conv_lu=True):
        super().__init__()
        width = AffineCoupling(in_channel).filter_size
        self.inner = _Glow(image_shape=(in_channel, 32, 32), levels=n_block, steps=n_flow, hidden_channels=width)

    def forward(self, x):
        out = self.inner.evaluate(x)
        return out.log_prob - out.logdet, out.logdet, out.zs
"""


def test_glow_step_runs_glowlab_and_adapters(tmp_path, monkeypatch) -> None:
    (tmp_path / "model.py").write_text(STAND_IN)
    monkeypatch.setenv("GLOW_PYTORCH_DIR", str(tmp_path))
    sys.path.insert(0, str(BENCHMARKS))
    import glow_step

    adapters = BENCHMARKS / "adapters"
    impls = ["glowlab", "glowlab:compile", str(adapters / "normflows_glow.py"), str(adapters / "rosinality_glow.py")]
    out = tmp_path / "results.json"
    args = [
        "--impl",
        *impls,
        "--hidden-channels",
        "8",
        "--steps",
        "2",
        "--batch",
        "4",
        "--pairs",
        "2",
        "--profile",
        "1",
        "--conv-floor",
    ]
    results = glow_step.main([*args, "--no-memory", "--peak-tflops", "1", "--roofline", "H200", "--json", str(out)])
    assert set(results) == {"glowlab", "glowlab:compile", "normflows_glow", "rosinality_glow"}
    for name, row in results.items():
        assert row["img_s"] > 0 and row["gflop_step"] > 0 and 0 < row["mfu"] < 1, name
        assert 0 < row["convolution_share"] < 1, name
        if name != "glowlab:compile":  # the replayed convolutions of an eager step: forward and backward
            assert 0 < row["convolutions_alone_ms"] < row["ms_step"], name
            assert row["convolution_calls"] > 0 and row["convolution_calls"] % 2 == 0, name
    assert results["glowlab:compile"]["convolutions_alone_ms"] is None
    # The roofline of each eager step on an H200 (a compiled step fuses kernels: none).
    assert results["glowlab:compile"]["roofline"] is None
    for name in ("glowlab", "normflows_glow", "rosinality_glow"):
        roof = results[name]["roofline"]
        assert roof["kernels"] > 0 and roof["gb_step"] > 0 and 0 < roof["mfu_max"] <= 1 + 1e-9, name
        assert roof["ms"] == pytest.approx(roof["compute_ms"] + roof["memory_ms"]), name
        assert roof["measured_over_roofline"] == pytest.approx(results[name]["ms_step"] / roof["ms"]), name
        assert "aten.convolution_backward.default" in roof["largest_ms"], name
    assert results["glowlab"]["roofline"]["kernels"] < results["normflows_glow"]["roofline"]["kernels"]
    assert results["rosinality_glow"]["params_m"] == pytest.approx(results["glowlab"]["params_m"])
    assert results["glowlab"]["operators"]["syncs"] == 0 and results["glowlab:compile"]["operators"] is None
    assert json.loads(out.read_text())["results"]["glowlab"]["ms_step"] > 0
    with pytest.raises(SystemExit, match="CUDA graphs need --device cuda"):
        glow_step.main(["--impl", "glowlab:graphs"])
    monkeypatch.setenv("GLOW_PYTORCH_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="GLOW_PYTORCH_DIR"):
        glow_step.main(["--impl", str(adapters / "rosinality_glow.py"), "--no-memory"])


@pytest.mark.parametrize(
    ("device_name", "bf16", "tf32", "tb_s"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4, 494.7, 3.35),
        ("NVIDIA H100 PCIe", 756.5, 378.0, 2.0),
        ("NVIDIA H100 NVL", 835.5, 417.5, 3.9),
        ("NVIDIA H200", 989.4, 494.7, 4.8),
        ("NVIDIA H200 NVL", 835.5, 417.5, 4.8),
        ("NVIDIA A100-SXM4-80GB", 312.0, 156.0, 2.039),
        ("NVIDIA A100 80GB PCIe", 312.0, 156.0, 1.935),
        ("NVIDIA A100-SXM4-40GB", 312.0, 156.0, 1.555),
        ("NVIDIA GeForce RTX 4090", None, None, None),
    ],
)
def test_mfu_peak_and_bandwidth_are_the_named_gpus_own(
    monkeypatch, device_name: str, bf16: float | None, tf32: float | None, tb_s: float | None
) -> None:
    # The PCIe and NVL parts peak lower than the SXM parts, whose names are prefixes of none of theirs;
    # the 80 GB A100s have faster memory than the 40 GB ones.
    sys.path.insert(0, str(BENCHMARKS))
    import glow_step

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    assert glow_step.peak_tflops("cuda", "bf16", None) == bf16
    assert glow_step.peak_tflops("cuda", "32", None) == tf32
    assert glow_step.peak_tflops("cuda", "bf16", 123.0) == 123.0
    assert glow_step.peak_tflops("cpu", "bf16", None) is None
    # The roofline's GPU: the device's own on CUDA, none for a GPU the table lacks unless named.
    gpu = glow_step.roofline_gpu(glow_step.parse_args(["--device", "cuda"]), "bf16")
    assert (gpu is None) if tb_s is None else (gpu.tflops, gpu.tb_s) == (bf16, tb_s)
    named = glow_step.parse_args(["--roofline", device_name.lower()])
    if tb_s is None:
        with pytest.raises(SystemExit, match="not a GPU this script knows"):
            glow_step.roofline_gpu(named, "32")
    else:
        assert glow_step.roofline_gpu(named, "32")[1:] == (tf32, tb_s)


def test_roofline_gpu_is_named_or_given() -> None:
    import glow_step

    assert glow_step.roofline_gpu(glow_step.parse_args([]), "32") is None  # CPU, none named
    with pytest.raises(SystemExit, match=r"--roofline B200: not a GPU this script knows .*--bandwidth"):
        glow_step.roofline_gpu(glow_step.parse_args(["--roofline", "B200"]), "bf16")
    given = ["--roofline", "B200", "--roofline-tflops", "2250", "--bandwidth", "8"]
    assert glow_step.roofline_gpu(glow_step.parse_args(given), "bf16") == ("B200", 2250.0, 8.0)
    overridden = glow_step.parse_args(["--roofline", "H200", "--bandwidth", "5"])
    assert glow_step.roofline_gpu(overridden, "bf16") == ("H200", 989.4, 5.0)
    # A CPU run's --peak-tflops is the CPU's, for its MFU: not the named GPU's.
    cpu_peak = glow_step.parse_args(["--roofline", "H200", "--peak-tflops", "1"])
    assert glow_step.roofline_gpu(cpu_peak, "32") == ("H200", 494.7, 4.8)


def test_roofline_of_a_cuda_device_is_its_own(monkeypatch) -> None:
    import glow_step

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert glow_step.roofline_gpu(glow_step.parse_args(["--device", "cuda"]), "bf16")[1:] == (756.5, 2.0)
    # On the device itself the roofline's peak is the one its MFU is measured against.
    given = glow_step.parse_args(["--device", "cuda", "--peak-tflops", "700"])
    assert glow_step.roofline_gpu(given, "bf16")[1:] == (700.0, 2.0)


def test_kernel_tally_counts_flops_and_bytes_by_hand() -> None:
    from roofline import KernelTally, tensor_bytes

    a, b = torch.ones(8, 16), torch.ones(16, 4)
    x = torch.ones(4, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    row = torch.ones(5)
    with KernelTally() as tally:
        a @ b  # a kernel: 2*8*16*4 FLOPs, reads 128 + 64 floats, writes 32
        a.t()  # a view: no kernel
        torch.add(a, a)  # reads its one distinct input once: 128 floats in, 128 out
        torch.empty(3, 3)  # an allocation: no kernel
        torch.zeros(2, 5).copy_(row.expand(2, 5))  # a fill (writes 10) and a copy: reads 5, writes 10
        x[:, :3] * 2  # half the channels of a channels-last tensor: 300 floats read, 300 written
        torch._foreach_add_([a, b], 1.0)  # in place, returning nothing: reads and writes 128 + 64 floats
    kernels = [(k.name, k.flops, k.bytes) for k in tally.kernels]
    assert kernels == [
        ("aten.mm.default", 2 * 8 * 16 * 4, (128 + 64 + 32) * 4),
        ("aten.add.Tensor", 0, 256 * 4),
        ("aten.zeros.default", 0, 10 * 4),
        ("aten.copy_.default", 0, (5 + 10) * 4),
        ("aten.mul.Tensor", 0, 600 * 4),
        ("aten._foreach_add_.Scalar", 0, 2 * 192 * 4),
    ]
    assert tensor_bytes(torch.ones(0, 3)) == 0 and tensor_bytes(torch.ones(3, 1).expand(3, 7)) == 12
    # The product's 1024 FLOPs at 1e5 FLOP/s (10.24 ms) outlast its 896 bytes at 1e6 B/s (0.896 ms):
    # compute-bound; the other kernels are memory-bound.
    roof = tally.roofline(peak_flops=1e5, bandwidth=1e6)
    memory = (256 + 10 + 15 + 600 + 384) * 4 / 1e6
    assert roof.kernels == 6 and roof.flops == 1024 and roof.bytes == (224 + 256 + 10 + 15 + 600 + 384) * 4
    assert roof.compute_seconds == pytest.approx(1024 / 1e5)
    assert roof.memory_seconds == pytest.approx(memory)
    assert roof.seconds == pytest.approx(roof.compute_seconds + memory)
    largest_first = [
        "aten.mm.default",
        "aten.mul.Tensor",
        "aten._foreach_add_.Scalar",
        "aten.add.Tensor",
        "aten.copy_.default",
        "aten.zeros.default",
    ]
    assert list(roof.by_operator) == largest_first
    assert roof.by_operator["aten.mul.Tensor"] == pytest.approx(600 * 4 / 1e6)


def test_main_job_reports_its_wall_time_and_test_bpd(tmp_path) -> None:
    out = tmp_path / "main.json"
    cmd = [sys.executable, str(BENCHMARKS / "main_job.py"), "--no-wandb", "--json", str(out)]
    printed = subprocess.run(
        [
            *cmd,
            "--trainer.max_steps",
            "24",
            "--trainer.check_val_every_n_epoch",
            "1",
            "--trainer.log_every_n_steps",
            "1",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    row = json.loads(out.read_text())["eager"]
    assert 0 < row["fit_s"] < row["wall_s"] and 2.0 < row["test_bpd"] < 6.0
    assert f"test bits/dim {row['test_bpd']:.4f}" in printed
    # One window of Throughput's 20 steps after the counted batch: model TFLOP/s, and no MFU on a CPU.
    assert row["tflops_per_device"] > 0 and row["mfu"] is None
    assert f"model TFLOP/s {row['tflops_per_device']:.4f}, MFU - (the last window's)" in printed


def test_gpu_check_runs_every_check_emulated_on_the_cpu() -> None:
    """The GPU checks' script itself, before GPU time is spent on it: every check, the capture emulated."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--emulate"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    verdicts = [line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(verdicts) == 19 and all(line.startswith("PASS") for line in verdicts), verdicts
    assert "PASS sync-free training step (1x1 convolution by slogdet, additive): 0 operators of" in result.stdout
    assert "PASS Adamax skip on the device: steps without a host synchronisation True; the poisoned" in result.stdout
    assert "PASS model FLOPs and MFU: " in result.stdout and "no MFU (no peak known for the device)" in result.stdout
    assert "all 19 checks passed" in result.stdout


def test_gpu_check_counts_a_nan_difference_as_the_largest() -> None:
    import gpu_check

    nan = torch.tensor([float("nan"), 1.0])
    assert gpu_check.max_relative(nan, torch.ones(2)) == math.inf
    assert max(0.0, gpu_check.max_relative(torch.ones(2), nan)) == math.inf  # max() would keep 0.0 over a NaN
    assert gpu_check.max_relative(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])) == 0.5


def test_gpu_check_reports_a_check_that_raises_and_runs_the_next(capsys) -> None:
    import gpu_check

    def failing_capture() -> None:
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nthe rest")

    already = len(gpu_check.failures)
    gpu_check.attempt("capture (x)", failing_capture)
    gpu_check.attempt("next", gpu_check.report, "next", True, "ran")
    printed = capsys.readouterr().out
    assert "FAIL capture (x): raised RuntimeError: CUDA error: operation not permitted when stream" in printed
    assert "PASS next: ran" in printed and gpu_check.failures[already:] == ["capture (x)"]


def test_loader_throughput_prints_every_figure() -> None:
    cmd = [sys.executable, str(BENCHMARKS / "loader_throughput.py"), "--images", "600", "--workers", "0"]
    cmd += ["--batch-size", "16", "--loader-batches", "3", "--model-batch-size", "1", "--model-steps", "1"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    figures = {line[:18].strip(): float(line[18:].split()[0].rstrip("x")) for line in out.splitlines() if line.strip()}
    assert set(figures) == {
        "prepare", "loader", "loader, unchecked", "loader, later pass", "sha256 of shards", "training (CIFAR)",
        "loader / training",
    }  # fmt: skip
    assert all(value > 0 for value in figures.values())


def test_transformer_sampling_times_both_paths_and_they_agree(tmp_path) -> None:
    import transformer_sampling

    result = transformer_sampling.main(["--num-samples", "2", "--repeats", "1", "--out", str(tmp_path / "t.json")])
    assert result["patches"] == 16 and result["cached_s"] > 0 and result["uncached_s"] > 0
    assert result["max_abs_difference"] == 0.0
    assert json.loads((tmp_path / "t.json").read_text())["speedup"] == result["speedup"]


def test_vs_normflows_quick_run_scores_every_model_on_the_same_batches(tmp_path) -> None:
    out = tmp_path / "vs_normflows.json"
    cmd = [sys.executable, str(BENCHMARKS / "vs_normflows.py"), "--steps", "10", "--draws", "1", "--ema", "0.9"]
    printed = subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    rows = run["results"]
    assert set(rows) == {"glowlab", "normflows", "glowlab+ema"} and run["same_training_batches"]
    assert result["config"]["steps"] == 10 and result["config"]["seeds"] == [0]
    assert abs(rows["glowlab"]["parameters"] - rows["normflows"]["parameters"]) < 0.01 * rows["glowlab"]["parameters"]
    for row in rows.values():
        assert 2.0 < row["test_bpd"] < 6.0 and row["test_stderr"] > 0 and row["img_s"] > 0
        assert row["test_images"] == 359
    difference = result["difference_bpd"]["glowlab - normflows"]["mean"]
    assert difference == pytest.approx(rows["glowlab"]["test_bpd"] - rows["normflows"]["test_bpd"], abs=1e-9)
    assert f"glowlab - normflows: {difference:+.4f}" in printed


def test_mixed_precision_compares_bf16_with_float32_on_a_digits_checkpoint(run, tmp_path) -> None:
    import mixed_precision

    out = tmp_path / "mp.json"
    figures = mixed_precision.main(["--ckpt", str(run["ckpt"]), "--images", "64", "--json", str(out)])
    assert json.loads(out.read_text()) == figures and figures["images"] == 64
    assert 0 < figures["bpd_per_image_abs_difference"] < 0.05 and 0 < figures["latent_relative_difference"] < 0.1
    # The float32 data path: decode undoes encode under autocast, bar a rare bfloat16 rounding step.
    assert figures["roundtrip_median_error"] < 1e-6 and figures["roundtrip_images_over_1e-4"] < 0.2


def test_mixed_precision_names_a_checkpoint_for_other_data(tmp_path) -> None:
    import mixed_precision

    from glowlab.models import Glow

    ckpt = tmp_path / "cifar.ckpt"
    model = Glow(image_shape=(3, 8, 8), levels=1, steps=1, hidden_channels=4)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": {"flow": model.config.to_dict()}, "state_dict": state}, ckpt)
    with pytest.raises(SystemExit, match=r"cifar\.ckpt.*digits"):
        mixed_precision.measure(ckpt)


def test_step_overhead_prints_the_loops_time_and_python_calls() -> None:
    def calls_per_iteration(*extra: str) -> int:
        cmd = [sys.executable, str(BENCHMARKS / "step_overhead.py"), "--steps", "70", "--count", "20", *extra]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=BENCHMARKS).stdout
        timing, calls = out.strip().splitlines()[-2:]
        iteration, bare = (float(timing.split(label)[1].split()[0]) for label in ("iteration", "bare step"))
        assert iteration > 0 and bare > 0 and "(cpu, torch" in timing
        per_iteration, per_step, added = (int(word) for word in calls.replace(":", "").split() if word.isdigit())
        assert per_iteration - per_step == added and per_step > 100 and added > 0
        return per_iteration

    # The config validates every 5 epochs of about 20 steps: none in the counted steps 49-68. With a
    # validation every epoch one falls in them (step 57); it and the checkpoints written after it
    # are no training step's (counted, they added about 1400 calls an iteration).
    assert calls_per_iteration("--trainer.check_val_every_n_epoch", "1") == pytest.approx(
        calls_per_iteration(), rel=0.1
    )
