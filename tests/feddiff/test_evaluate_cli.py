"""`feddiff evaluate`: the FD of a checkpoint, an exported model and a personalised model, against the test
set or a folder, in text and JSON; a trained tiny model scores better than an untrained one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedcore.evaluation import extractors
from fedcore.model.unet import build_model
from fedcore.payload.serialization import save_file
from feddiff.cli import main

pytestmark = pytest.mark.e2e

SAMPLING = ["--samples", "200", "--steps", "10", "--reference-images", "2000", "--threads", "1", "--device", "cpu"]
# Enough to tell a trained model from an untrained one; the tests of seeds, exports, folders and personalised
# models compare FDs of the same sampling, so they sample a few images in a few steps.
FEW = ["--samples", "32", "--steps", "4", *SAMPLING[4:]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> Path:
    """`feddiff simulate`: centralised (K = 1, full), the tiny model on 2,000 images for 3 epochs at lr 2e-3."""
    out = tmp_path_factory.mktemp("evaluate") / "run"
    code = main(["simulate", "--model", "tiny", "--strategy", "full", "--num-clients", "1", "--rounds", "1", "--epochs", "3",
                 "--batch-size", "32", "--lr", "2e-3", "--max-images", "2000", "--threads", "1", "--out-dir", str(out)])  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="module")
def untrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("untrained") / "untrained.safetensors"
    save_file(path, dict(build_model("tiny", seed=0).state_dict()), {})
    return path


def _evaluate(capsys: pytest.CaptureFixture[str], *argv: str, sampling: list[str] = FEW) -> dict:
    assert main(["evaluate", *argv, *sampling, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_trained_checkpoint_scores_lower_than_untrained_model(trained: Path, untrained: Path, capsys) -> None:
    after = _evaluate(capsys, "--checkpoint", str(trained), sampling=SAMPLING)
    before = _evaluate(capsys, "--checkpoint", str(untrained), "--model", "tiny", sampling=SAMPLING)

    assert 0 < after["fd"] < 0.85 * before["fd"]
    assert after["noise_fd"] == before["noise_fd"] and after["fd"] < after["noise_fd"]  # the same 200 noise images (seed 0)
    assert after["grid"] is None
    assert after["samples"] == 200 and after["sampler"] == "ddim" and after["steps"] == 10
    assert after["reference"] == {"dataset": "fashion-mnist/test[:2000]", "count": 2000}
    assert after["feature_extractor"].startswith("fmnist-cnn:") and after["completed_rounds"] == 1


def test_same_seed_same_fd_other_seed_other_fd(trained: Path, capsys) -> None:
    first = _evaluate(capsys, "--checkpoint", str(trained), "--seed", "3")
    again = _evaluate(capsys, "--checkpoint", str(trained), "--seed", "3")
    other = _evaluate(capsys, "--checkpoint", str(trained), "--seed", "4")

    assert first["fd"] == again["fd"] and other["fd"] != first["fd"]


def test_exported_model_scores_as_its_checkpoint(trained: Path, tmp_path: Path, capsys) -> None:
    exported = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(trained), "--out", str(exported)]) == 0
    capsys.readouterr()

    assert _evaluate(capsys, "--checkpoint", str(exported))["fd"] == _evaluate(capsys, "--checkpoint", str(trained))["fd"]


def test_reference_folder_and_text_output(trained: Path, tmp_path: Path, fashion_mnist_dir: Path, capsys) -> None:
    from fedcore.data.datasets import load_fashion_mnist

    folder = tmp_path / "real"
    folder.mkdir()
    for i, image in enumerate(load_fashion_mnist(train=False).images[:300, 0]):
        Image.fromarray(np.asarray(image)).save(folder / f"{i:03d}.png")
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"a grid of mine")
    argv = ["evaluate", "--checkpoint", str(trained), "--reference-dir", str(folder), "--grid", str(grid), *FEW[:4], "--threads", "1"]

    refused = main(argv)
    err = capsys.readouterr().err
    code = main([*argv, "--force"])

    out = capsys.readouterr().out
    assert refused == 2 and err == f"feddiff evaluate: error: --grid {str(grid)!r}: a file already there; pass --force to replace it, or give another --grid\n"
    assert code == 0 and out.startswith("FD ") and " (lower is better): 32 ddim-4 samples of " in out and f"300 images of folder:{folder}" in out
    assert "; as many images of uniform noise score " in out and out.endswith(
        f"; from fewer than 1,000 samples an FD comes out higher: compare it only with FDs of as many samples; grid of the first 32 in {grid}\n"
    )
    assert Image.open(grid).size[0] > 100


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--samples", "1"], "--samples = '1': expected an integer in 2..100000"),
        (["--steps", "0"], "--steps = '0': expected an integer in 1..1000"),
        (["--reference-images", "-5"], "--reference-images = '-5': expected an integer >= 0"),
        (["--reference-images", "10001"], "--reference-images 10,001: Fashion-MNIST's test set has 10,000 images; give at most 10,000 (0 = all)"),
    ],
)
def test_bad_flags_name_the_value(trained: Path, fashion_mnist_dir: Path, capsys, argv: list[str], message: str) -> None:
    assert main(["evaluate", "--checkpoint", str(trained), *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert f"--checkpoint = '{tmp_path / 'nope'}': expected a readable file or folder; no such file or folder" in capsys.readouterr().err


def test_personalised_model_of_a_client(tmp_path: Path, fashion_mnist_dir: Path, capsys) -> None:
    out = tmp_path / "udec"
    assert main(["simulate", "--model", "tiny", "--strategy", "udec", "--num-clients", "2", "--rounds", "1", "--epochs", "1",
                 "--max-images", "128", "--threads", "1", "--out-dir", str(out)]) == 0  # fmt: skip
    capsys.readouterr()

    one = _evaluate(capsys, "--checkpoint", str(out), "--worker-state", str(out / "clients"), "--client", "client-1")
    zero = _evaluate(capsys, "--checkpoint", str(out), "--worker-state", str(out / "clients"), "--private-stem", "client-0")

    assert one["kind"] == "personalised" and one["worker"] == "client-1"
    assert one["fd"] != zero["fd"]  # own encoders and bottlenecks


def test_a_classifier_asset_that_is_not_the_committed_one_is_a_clear_error(untrained: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    assets = tmp_path / "assets"
    shutil.copytree(extractors.ASSET_DIR, assets)
    manifest = assets / extractors.CLASSIFIER_MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "sha256": "0" * 64}))
    monkeypatch.setattr(extractors, "ASSET_DIR", assets)

    assert main(["evaluate", "--checkpoint", str(untrained), "--model", "tiny", "--threads", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.splitlines()

    weights = assets / extractors.CLASSIFIER_WEIGHTS
    assert len(err) == 1 and err[0].startswith(f"feddiff evaluate: error: {str(weights)!r} has sha256 "), err
    assert f"but {str(manifest)!r} records {'0' * 64}" in err[0]


@pytest.mark.parametrize(
    ("flag", "make", "words"),
    [
        ("--inception-weights", lambda p: (p / "text.txt").write_text("my notes") and p / "text.txt", "{flag}: {given!r} is not a torch state dict of tensors"),
        ("--reference-dir", lambda p: (p / "empty").mkdir() or p / "empty", "{flag} {given!r}: image folder "),
    ],
    ids=["inception-weights-text", "reference-dir-without-images"],
)
def test_a_weights_file_or_reference_folder_that_is_not_one_names_its_flag(untrained: Path, tmp_path: Path, capsys, flag: str, make, words: str) -> None:
    given = make(tmp_path)

    code = main(["evaluate", "--checkpoint", str(untrained), flag, str(given), "--model", "tiny", *FEW])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"feddiff evaluate: error: {words.format(flag=flag, given=str(given))}") and err.count("\n") == 1, err


@pytest.mark.parametrize(("fd", "samples", "says_noise", "says_few"), [(5000.0, 64, True, True), (900.0, 1000, False, False), (4259.61, 2000, True, False)])
def test_the_line_says_when_a_model_is_no_better_than_noise_and_when_samples_are_few(fd: float, samples: int, says_noise: bool, says_few: bool) -> None:
    from feddiff.models_cli import _evaluation_line

    result = {
        "fd": fd, "noise_fd": 4259.61, "samples": samples, "sampler": "ddim", "steps": 20, "model": "the global model of 'run'",
        "reference": {"dataset": "fashion-mnist/test", "count": 10000}, "feature_extractor": "fmnist-cnn:x", "seed": 0, "device": "cpu", "grid": None,
    }  # fmt: skip

    line = _evaluation_line(result)

    assert line.startswith(f"FD {fd:.2f} (lower is better): {samples:,} ddim-20 samples of the global model of 'run' against 10,000 images")
    assert ("(this model is no better than noise)" in line) is says_noise
    assert ("from fewer than 1,000 samples an FD comes out higher" in line) is says_few
