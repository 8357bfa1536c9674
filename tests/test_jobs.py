"""Evaluation and generation jobs: bits/dim, FID, sampling, interpolation, manipulation."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import synthetic_npz
from helpers import glow_module, quiet_trainer
from PIL import Image

import glowlab
from glowlab.cli import main
from glowlab.data import PrepareOptions, load_source, prepare
from glowlab.data.prepare import sha256_of
from glowlab.data.shards import read_samples
from glowlab.images import attribute_direction, interpolate, levels_to_model, manipulate, slerp
from glowlab.jobs.bpd import evaluate_bpd
from glowlab.jobs.classifier import load_classifier, to_uint8, train_classifier
from glowlab.jobs.fid import INCEPTION_FILE, fid_from_stats, held_out_split, inception_weights, make_metric
from glowlab.models import Glow
from glowlab.training import ShardDataModule

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_evaluate_bpd_agrees_with_the_logged_validation_bpd(run, tmp_path) -> None:
    one = evaluate_bpd(
        ckpt=str(run["ckpt"]), data_root=str(run["data"]), split="val", draws=1, out=tmp_path / "val.json"
    )
    with open(run["log"] / "metrics.csv") as f:
        logged = [float(r["val_bpd"]) for r in csv.DictReader(f) if r["val_bpd"]]
    # best.ckpt is the lowest validation point; draw 0 is the noise validation used.
    assert one["bpd"] == pytest.approx(min(logged), abs=1e-5)
    assert one["num_images"] == 180 and json.loads((tmp_path / "val.json").read_text())["bpd"] == one["bpd"]
    four = evaluate_bpd(ckpt=str(run["ckpt"]), data_root=str(run["data"]), split="val", draws=4)
    assert four["bpd_per_draw"][0] == pytest.approx(one["bpd"], abs=1e-9)
    assert len(set(four["bpd_per_draw"])) == 4  # different dequantization noise per draw
    assert four["bpd"] == pytest.approx(np.mean(four["bpd_per_draw"]), abs=1e-9)
    assert 0 < four["stderr"] < 0.1


def test_importance_weighted_bpd_equals_the_plain_figure_at_one_draw_and_tightens(run, tmp_path) -> None:
    common = ["evaluate", "bpd", "--ckpt", str(run["ckpt"]), "--data", str(run["data"]), "--split", "val"]
    bounds = {}
    for k in (1, 8, 32):
        main([*common, "--importance", str(k), "--out", str(tmp_path / f"k{k}.json")])
        result = json.loads((tmp_path / f"k{k}.json").read_text())
        assert result["draws"] == k and result["importance_weighted"]["draws"] == k
        bounds[k] = result["importance_weighted"]["bpd"]
        assert bounds[k] <= result["bpd"] + 1e-12 and 0 < result["importance_weighted"]["stderr"] < 0.1
        if k == 1:
            assert bounds[1] == pytest.approx(result["bpd"], abs=1e-12)
    assert bounds[1] > bounds[8] > bounds[32]


def test_feature_classifier_learns_the_digits(run) -> None:
    result = train_classifier(str(run["data"]), epochs=15)
    assert result["val_accuracy"] > 0.85 and Path(result["path"]).is_file()


def test_train_classifier_gives_the_same_weights_for_a_seed(tmp_path, capsys) -> None:
    from datasets import prepared_digits

    data = str(prepared_digits(tmp_path / "digits"))
    files = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        files[name] = tmp_path / f"{name}.pt"
        main(
            [
                "evaluate",
                "train-classifier",
                "--data",
                data,
                "--epochs",
                "1",
                "--seed",
                str(seed),
                "--out",
                str(files[name]),
            ]
        )
    assert "seed 3, 1 epochs" in capsys.readouterr().out
    (_, a), (_, b), (_, c) = (load_classifier(files[n]) for n in "abc")
    assert a["seed"] == b["seed"] == 3 and c["seed"] == 4 and a["epochs"] == 1
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])  # bitwise
    assert a["val_accuracy"] == b["val_accuracy"]
    assert not all(torch.equal(a["state_dict"][k], c["state_dict"][k]) for k in a["state_dict"])  # the seed counts


def _fid_self_and_noise(metric_factory, images: torch.Tensor) -> list[float]:
    values = []
    for sigma in (0.0, 20.0, 60.0):
        metric = metric_factory()
        metric.update(images, real=True)
        noisy = images.float() + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
        metric.update(noisy.clamp(0, 255).to(torch.uint8), real=False)
        values.append(
            fid_from_stats(
                *(
                    {
                        n: getattr(metric, f"{s}_{n}")
                        for n in ("features_sum", "features_cov_sum", "features_num_samples")
                    }
                    for s in ("real", "fake")
                )
            )
        )
    return values


def test_fid_is_zero_on_itself_and_grows_with_noise_classifier(run) -> None:
    if not (run["data"] / "fid_classifier.pt").is_file():
        train_classifier(str(run["data"]), epochs=5)
    images = to_uint8(read_samples(str(run["data"]), "train", limit=400).levels, 17)
    same, small, large = _fid_self_and_noise(lambda: make_metric("classifier", str(run["data"]))[0], images)
    assert abs(same) < 1e-6 and same < small < large


def random_inception_weights(path: Path, monkeypatch) -> Path:
    """A structurally valid InceptionV3 weights file with random values (the real file is not shipped)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None)
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(model.state_dict(), path)
    return path


def test_fid_with_inception_weights_from_a_local_file(tmp_path, monkeypatch) -> None:
    weights = random_inception_weights(tmp_path / "inception.pth", monkeypatch)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8))  # grey: repeated to RGB
    identities = []

    def metric() -> torch.nn.Module:
        made, identity = make_metric("inception", str(tmp_path), weights)
        identities.append(identity)
        return made

    same, small, large = _fid_self_and_noise(metric, images)
    assert abs(same) < 1e-3 * large and same < small < large
    identity = identities[0]
    assert identity["sha256"] == sha256_of(weights) and identity["size_bytes"] == weights.stat().st_size
    assert identity["kind"] == "inception" and identity["name"] == f"inception-{identity['sha256'][:12]}"


def test_missing_inception_weights_fail_at_once_with_a_helpful_message(tmp_path, monkeypatch, run, capsys) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        inception_weights()
    message = str(err.value)
    assert INCEPTION_FILE in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "--inception-weights" in message
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "fid", "--ckpt", str(run["ckpt"]), "--data", str(run["data"]), "--num-samples", "4"])
    assert exit_info.value.code == 2 and INCEPTION_FILE in capsys.readouterr().err
    assert time.perf_counter() - start < 10


def test_fid_parts_merge_to_the_single_run(run, tmp_path) -> None:
    if not (run["data"] / "fid_classifier.pt").is_file():
        train_classifier(str(run["data"]), epochs=5)
    common = ["evaluate", "fid", "--ckpt", str(run["ckpt"]), "--data", str(run["data"]), "--features", "classifier"]
    common += ["--num-samples", "50", "--batch-size", "20", "--cache-dir", str(tmp_path / "cache")]
    main([*common, "--out", str(tmp_path / "fid.json")])
    for p in range(3):
        main([*common, "--part", str(p), "--parts", "3", "--out", str(tmp_path / f"part{p}.pt")])
    main(
        [
            "evaluate",
            "fid-merge",
            *[str(tmp_path / f"part{p}.pt") for p in range(3)],
            "--out",
            str(tmp_path / "merged.json"),
        ]
    )
    single, merged = (json.loads((tmp_path / n).read_text()) for n in ("fid.json", "merged.json"))
    assert merged["fid"] == pytest.approx(single["fid"], rel=1e-6) and single["fid"] > 0
    for key in ("fid_at_reference_size", "reference_fid"):
        assert merged[key] == pytest.approx(single[key], rel=1e-6)
    for key in ("reference_split", "reference_size", "feature_extractor", "num_samples", "temperature", "seed"):
        assert merged[key] == single[key]
    # Real and held-out statistics computed once each, then reused by the parts.
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    with pytest.raises(SystemExit):
        main(["evaluate", "fid-merge", str(tmp_path / "part0.pt"), "--out", str(tmp_path / "x.json")])


def test_fid_result_carries_a_real_vs_real_reference_and_the_extractor_identity(run, tmp_path, capsys) -> None:
    classifier = tmp_path / "classifier.pt"
    trained = train_classifier(str(run["data"]), epochs=1, seed=7, out=classifier)
    common = ["evaluate", "fid", "--ckpt", str(run["ckpt"]), "--data", str(run["data"]), "--features", "classifier"]
    common += ["--classifier", str(classifier), "--cache-dir", str(tmp_path / "cache"), "--temperature", "0.7"]
    main([*common, "--num-samples", "400", "--seed", "2", "--out", str(tmp_path / "fid.json")])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads((tmp_path / "fid.json").read_text())
    # 400 samples, 359 test images: the reference and the model's head are taken at 359 images.
    assert result["reference_split"] == "test" and result["reference_size"] == 359
    assert result["num_samples"] == 400 and result["temperature"] == 0.7 and result["seed"] == 2
    assert result["split"] == "train" and result["real_images"] == 1258
    assert np.isfinite(result["reference_fid"]) and result["reference_fid"] >= 0
    assert np.isfinite(result["fid_at_reference_size"]) and result["fid_at_reference_size"] != result["fid"]
    assert result["feature_extractor"] == {
        "kind": "classifier",
        "path": str(classifier),
        "sha256": sha256_of(classifier),
        "val_accuracy": trained["val_accuracy"],
        "seed": 7,
        "epochs": 1,
        "data": trained["data"],
    }
    assert result["features"] == f"classifier-{sha256_of(classifier)[:12]}"
    for text in ("400 samples at T=0.7", "seed 2", "1258 train images", "at 359 samples", "359 test images"):
        assert text in line, line
    assert f"val accuracy {trained['val_accuracy']:.3f}, seed 7, 1 epochs" in line
    # Fewer samples than held-out images: the reference is at the sample count; against val, the
    # held-out images are the test split's, and against test, val's.
    main([*common, "--num-samples", "30", "--out", str(tmp_path / "small.json")])
    small = json.loads((tmp_path / "small.json").read_text())
    assert small["reference_size"] == 30 and small["fid_at_reference_size"] == small["fid"]
    assert small["reference_fid"] == pytest.approx(
        fid_from_stats(
            torch.load(small["real_statistics"], weights_only=True),
            torch.load(small["reference_statistics"], weights_only=True),
        )
    )
    manifest = json.loads((run["data"] / "manifest.json").read_text())
    assert held_out_split(manifest, "train") == "test" and held_out_split(manifest, "test") == "val"
    assert held_out_split(manifest, "val") == "test"
    manifest["splits"]["test"]["count"] = 0
    assert held_out_split(manifest, "train") == "val" and held_out_split(manifest, "val") is None


def _tiny_model(num_classes: int | None = None) -> Glow:
    torch.manual_seed(0)
    model = Glow(image_shape=(1, 8, 8), levels=2, steps=2, hidden_channels=8, num_classes=num_classes)
    x = torch.rand(16, 1, 8, 8) - 0.5
    model.log_prob(x, torch.arange(16) % num_classes if num_classes else None)
    return model.eval()


@pytest.mark.parametrize("mode", ["linear", "slerp"])
@pytest.mark.parametrize("num_classes", [None, 3])
def test_interpolation_endpoints_reconstruct_the_inputs(mode: str, num_classes: int | None) -> None:
    model = _tiny_model(num_classes)
    levels = torch.randint(0, 17, (3, 1, 8, 8))
    x = levels_to_model(levels, 17, "cpu")
    y = torch.tensor([1]) if num_classes else None
    frames = interpolate(model, x, steps=5, mode=mode, y=y)
    assert frames.shape == (9, 1, 8, 8)
    for frame, original in ((0, 0), (4, 1), (8, 2)):
        assert (frames[frame] - x[original]).abs().max() < 1e-4
        assert torch.equal(torch.floor((frames[frame] + 0.5) * 17).long(), levels[original])


def test_slerp_keeps_the_norm_between_equal_norm_latents() -> None:
    a, b = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    b = b * a.norm() / b.norm()
    mid = slerp(a, b, 0.5)
    assert mid.norm().item() == pytest.approx(a.norm().item(), rel=1e-5)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)


def test_manipulation_with_strength_zero_is_the_identity() -> None:
    model = _tiny_model()
    x = levels_to_model(torch.randint(0, 17, (6, 1, 8, 8)), 17, "cpu")
    direction = attribute_direction(model, x, torch.tensor([1, 1, 1, 0, 0, 0]))
    out = manipulate(model, x[:2], direction, [0.0, 1.0])
    assert (out[0] - x[0]).abs().max() < 1e-4 and (out[2] - x[1]).abs().max() < 1e-4
    assert (out[1] - x[0]).abs().max() > 1e-3
    # Moving by the full direction shifts the latent mean of the "without" group onto the "with" group.
    zs, _ = model.encode(x)
    moved, _ = model.encode(manipulate(model, x[3:], direction, [1.0]))
    for z, m in zip(zs, moved, strict=True):
        assert torch.allclose(m.mean(0), z[:3].mean(0), atol=1e-3)
    with pytest.raises(ValueError, match="some images and not others"):
        attribute_direction(model, x, torch.ones(6))


def test_attributes_travel_through_prepare(tmp_path) -> None:
    npz = synthetic_npz(tmp_path / "s.npz", 12, (1, 8, 8))
    arrays = dict(np.load(npz))
    arrays["attributes"] = np.stack([np.arange(12) % 2 * 2 - 1, np.arange(12) // 6], axis=1)  # -1/1 and 0/1 columns
    arrays["attribute_names"] = np.array(["Smiling", "Young"])
    np.savez(npz, **arrays)
    manifest = prepare(
        load_source("npz", str(npz)), tmp_path / "out", PrepareOptions(val_fraction=0, test_fraction=0), progress=False
    )
    assert manifest["attribute_names"] == ["Smiling", "Young"]
    samples = read_samples(str(tmp_path / "out"), "train", limit=12)
    order = samples.levels.flatten(1)
    source = load_source("npz", str(npz))
    for row, attrs in zip(order, samples.attributes, strict=True):
        i = next(j for j in range(12) if np.array_equal(source.image(j)[:, :, 0].flatten(), row.numpy()))
        assert attrs.tolist() == [int(i % 2), int(i // 6)]


def test_end_to_end_jobs_on_digits(run, tmp_path) -> None:
    ckpt, data = str(run["ckpt"]), str(run["data"])
    out = tmp_path
    main(
        [
            "sample",
            "--ckpt",
            ckpt,
            "--num-samples",
            "8",
            "--temperature",
            "0",
            "0.5",
            "0.6",
            "0.7",
            "0.8",
            "0.9",
            "1",
            "--out",
            str(out / "sweep.png"),
        ]
    )
    main(["evaluate", "bpd", "--ckpt", ckpt, "--data", data, "--draws", "2", "--out", str(out / "bpd.json")])
    main(["evaluate", "train-classifier", "--data", data, "--epochs", "5"])
    main(
        [
            "evaluate",
            "fid",
            "--ckpt",
            ckpt,
            "--data",
            data,
            "--features",
            "classifier",
            "--num-samples",
            "200",
            "--cache-dir",
            str(out / "cache"),
            "--out",
            str(out / "fid.json"),
        ]
    )
    main(
        [
            "interpolate",
            "--ckpt",
            ckpt,
            "--data",
            data,
            "--indices",
            "0",
            "1",
            "2",
            "--steps",
            "6",
            "--mode",
            "slerp",
            "--out",
            str(out / "interp.png"),
        ]
    )
    main(
        [
            "manipulate",
            "--ckpt",
            ckpt,
            "--data",
            data,
            "--attribute",
            "class=0",
            "--direction-images",
            "600",
            "--indices",
            "0",
            "1",
            "--out",
            str(out / "manip.png"),
        ]
    )
    # Grids of 34-pixel cells (32 + padding), with a label margin left of the rows (and above labelled columns).
    sweep, interp, manip = (Image.open(out / f"{name}.png").size for name in ("sweep", "interp", "manip"))
    assert sweep[1] == 7 * 34 + 2 and sweep[0] > 8 * 34 + 2  # 7 temperatures x 8 samples
    # 0 -> 1 and 1 -> 2: one row each of input, gap, 6 frames, gap, input; t above the frames.
    assert interp[1] == 18 + 2 * 34 + 2 and interp[0] > 10 * 34 + 2
    assert manip[1] == 18 + 2 * 34 + 2 and manip[0] > 5 * 34 + 2  # images x strengths, strengths above
    bpd = json.loads((out / "bpd.json").read_text())
    assert bpd["num_images"] == 359 and 0 < bpd["bpd"] < np.log2(17)
    assert json.loads((out / "fid.json").read_text())["fid"] > 0
    with pytest.raises(SystemExit):
        main(["manipulate", "--ckpt", ckpt, "--data", data, "--attribute", "Smiling"])


def test_conditional_sample_grid_by_class(run, tmp_path) -> None:
    data = ShardDataModule(root=str(run["data"]), batch_size=32)
    module = glow_module(image_shape=(1, 8, 8), n_bins=17, levels=2, steps=1, hidden_channels=8, num_classes=10)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "cond.ckpt")
    main(
        [
            "sample",
            "--ckpt",
            str(tmp_path / "cond.ckpt"),
            "--num-samples",
            "4",
            "--classes",
            "0",
            "3",
            "7",
            "--out",
            str(tmp_path / "classes.png"),
        ]
    )
    width, height = Image.open(tmp_path / "classes.png").size
    assert height == 3 * 34 + 2 and width > 4 * 34 + 2  # one labelled row per class
    model = glowlab.load(tmp_path / "cond.ckpt")
    assert model.num_classes == 10 and model.n_bins == 17
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(run["ckpt"]), "--classes", "1", "--out", str(tmp_path / "x.png")])
