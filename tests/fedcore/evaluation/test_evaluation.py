"""Frechet distance: the pinned classifier, the formula on known Gaussians, and sanity checks on real images."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from fedcore.data.datasets import load_fashion_mnist, to_model_range
from fedcore.errors import AssetIntegrityError
from fedcore.evaluation.extractors import (
    ASSET_DIR,
    CLASSIFIER_MANIFEST,
    CLASSIFIER_WEIGHTS,
    load_extractor,
    load_fmnist_classifier,
    load_inception,
    sha256_of_file,
)
from fedcore.evaluation.fid import (
    CACHE_DIR_ENV,
    ReferenceStats,
    ReferenceStatsCache,
    curve_point_due,
    default_cache_dir,
    feature_statistics,
    frechet_distance,
)
from fedcore.evaluation.inception import FID_FEATURE_DIM, FIDInceptionV3

N_IMAGES = 2000  # images per set in the sanity checks

# Measured with the committed classifier (sha256 8120e5f0...), N_IMAGES per set: FD(test, train) is 13.2 here
# and 14.5-16.4 for other train samples (the finite-sample bias of 128-d statistics); uniform noise 4,279;
# train images blurred with sigma 0.5 / 1 / 2: 109 / 1,483 / 3,766.
REAL_VS_REAL_MAX = 30.0


@pytest.fixture(scope="module")
def classifier():
    torch.set_num_threads(2)
    return load_fmnist_classifier()


@pytest.fixture(scope="module")
def test_subset() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_fashion_mnist(train=False)
    idx = np.random.default_rng(0).choice(len(data), N_IMAGES, replace=False)
    return to_model_range(data.images[idx]), torch.from_numpy(data.class_labels()[idx])


@pytest.fixture(scope="module")
def train_subset() -> torch.Tensor:
    data = load_fashion_mnist(train=True)
    idx = np.random.default_rng(1).choice(len(data), N_IMAGES, replace=False)
    return to_model_range(data.images[idx])


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) with edge replication."""
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))  # along W
    return F.conv2d(out, kernel.view(1, 1, -1, 1))  # along H


# ---------------------------------------------------------------------------------------------------------
# The committed classifier


def test_committed_weights_match_their_manifest():
    manifest = json.loads((ASSET_DIR / CLASSIFIER_MANIFEST).read_text())

    assert sha256_of_file(ASSET_DIR / CLASSIFIER_WEIGHTS) == manifest["sha256"]
    assert manifest["test_accuracy"] >= 0.90
    assert (ASSET_DIR / CLASSIFIER_WEIGHTS).stat().st_size < 2 * 1024 * 1024
    with safe_open(ASSET_DIR / CLASSIFIER_WEIGHTS, framework="pt") as f:
        metadata = f.metadata() or {}  # what tools/train_fd_classifier.py wrote beside the weights
    assert float(metadata["test_accuracy"]) == pytest.approx(manifest["test_accuracy"], abs=1e-4)


def test_classifier_accuracy_on_test_images(classifier, test_subset):
    images, labels = test_subset

    with torch.no_grad():
        predictions = classifier.network(images).argmax(dim=1)

    assert (predictions == labels).float().mean().item() >= 0.89


def test_classifier_features_do_not_depend_on_batching(classifier, test_subset):
    features = classifier.features(test_subset[0][:10], batch_size=4)

    assert features.shape == (10, classifier.dim) == (10, 128)
    assert torch.isfinite(features).all()
    torch.testing.assert_close(features, classifier.features(test_subset[0][:10]), rtol=1e-4, atol=1e-4)


def test_changed_weights_are_refused(tmp_path):
    for name in (CLASSIFIER_WEIGHTS, CLASSIFIER_MANIFEST):
        shutil.copy(ASSET_DIR / name, tmp_path / name)
    weights = bytearray((tmp_path / CLASSIFIER_WEIGHTS).read_bytes())
    weights[-1] ^= 0x01
    (tmp_path / CLASSIFIER_WEIGHTS).write_bytes(bytes(weights))

    with pytest.raises(AssetIntegrityError, match="sha256"):
        load_fmnist_classifier(asset_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------
# The formula on Gaussians with a closed form


def random_covariance(dim: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_identical_statistics_have_zero_distance():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=16), random_covariance(16, rng)

    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_diagonal_covariances_match_closed_form():
    # For diagonal S1, S2: d^2 = ||mu1 - mu2||^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2.
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 4.0, size=8), rng.uniform(0.1, 4.0, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)

    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # 1-D: (mu1 - mu2)^2 + (sd1 - sd2)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[1.0]])) == (pytest.approx(9.0 + 1.0))


def test_distance_is_invariant_to_a_common_rotation():
    # Rotating both Gaussians makes the covariances non-diagonal but keeps the distance.
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = np.diag(rng.uniform(0.1, 4.0, size=8)), np.diag(rng.uniform(0.1, 4.0, size=8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))

    rotated = frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T)

    assert rotated == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-6)


def test_singular_covariances_give_a_finite_distance():
    rng = np.random.default_rng(3)
    mu, sigma = feature_statistics(rng.normal(size=(5, 32)))  # rank 4 covariance in 32 dimensions

    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-3
    assert frechet_distance(mu, sigma, mu + 1.0, sigma) == pytest.approx(32.0, abs=1e-2)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------------------------------------
# Sanity checks on real images: a broken metric fails at least one of these


@pytest.fixture(scope="module")
def reference(classifier, test_subset) -> ReferenceStats:
    return ReferenceStats.compute(classifier, test_subset[0], dataset="fashion-mnist/test[2000]")


@pytest.fixture(scope="module")
def real_vs_real(classifier, reference, train_subset) -> float:
    return reference.frechet_distance_to(classifier, train_subset)


def test_real_test_and_train_images_are_close(real_vs_real):
    assert 0.0 <= real_vs_real < REAL_VS_REAL_MAX


def test_uniform_noise_is_far_from_real_images(classifier, reference, real_vs_real):
    noise = torch.rand((N_IMAGES, 1, 28, 28), generator=torch.Generator().manual_seed(0)) * 2 - 1

    fd_noise = reference.frechet_distance_to(classifier, noise)

    assert fd_noise > 20 * real_vs_real
    assert fd_noise > 20 * REAL_VS_REAL_MAX


def test_distance_grows_with_blur(classifier, reference, train_subset, real_vs_real):
    fds = [reference.frechet_distance_to(classifier, gaussian_blur(train_subset, s)) for s in (0.5, 1.0, 2.0)]

    assert real_vs_real < fds[0] < fds[1] < fds[2], fds


def test_the_reference_path_is_the_formula_on_both_image_sets(classifier, test_subset, train_subset, real_vs_real):
    mu_train, sigma_train = feature_statistics(classifier.features(train_subset))
    mu_test, sigma_test = feature_statistics(classifier.features(test_subset[0]))

    assert frechet_distance(mu_train, sigma_train, mu_test, sigma_test) == pytest.approx(real_vs_real, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Reference statistics cache


class CountingExtractor:
    """The classifier, counting how many images it featurizes (a computed reference counts; a cached one not)."""

    def __init__(self, extractor):
        self._extractor = extractor
        self.name, self.dim = extractor.name, extractor.dim
        self.featurized = 0

    def features(self, images, batch_size=None):
        self.featurized += len(images)
        return self._extractor.features(images, batch_size)


def test_reference_stats_are_computed_once_and_persist(classifier, test_subset, tmp_path):
    counting = CountingExtractor(classifier)
    images = test_subset[0][:200]

    cache = ReferenceStatsCache(tmp_path)
    first = cache.get(counting, "fashion-mnist/test[200]", images)
    again = cache.get(counting, "fashion-mnist/test[200]", images.clone())
    reloaded = ReferenceStatsCache(tmp_path).get(counting, "fashion-mnist/test[200]", images)

    assert counting.featurized == 200
    assert again is first
    assert reloaded.extractor == first.extractor and reloaded.count == 200
    np.testing.assert_array_equal(reloaded.mu, first.mu)
    np.testing.assert_array_equal(reloaded.sigma, first.sigma)
    assert len(list(tmp_path.glob("*.npz"))) == 1 and not list(tmp_path.glob(".*tmp*"))


def test_other_images_under_the_same_name_get_their_own_statistics(classifier, test_subset, tmp_path):
    counting = CountingExtractor(classifier)
    a = ReferenceStatsCache(tmp_path).get(counting, "fashion-mnist/test", test_subset[0][:100])
    b = ReferenceStatsCache(tmp_path).get(counting, "fashion-mnist/test", test_subset[0][100:200])

    assert counting.featurized == 200
    assert not np.array_equal(a.mu, b.mu)
    assert len(list(tmp_path.glob("*.npz"))) == 2


@pytest.mark.parametrize("damage", ["truncated", "other_count", "not_finite"])
def test_a_damaged_or_foreign_cache_file_is_computed_again_and_replaced(classifier, test_subset, tmp_path, damage, caplog):
    images = test_subset[0][:100]
    good = ReferenceStatsCache(tmp_path).get(classifier, "fashion-mnist/test", images)
    (path,) = tmp_path.glob("*.npz")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "other_count":
        ReferenceStats(good.extractor, good.dataset, 99, good.mu, good.sigma).save(path)
    else:
        ReferenceStats(good.extractor, good.dataset, 100, good.mu * np.nan, good.sigma).save(path)

    counting = CountingExtractor(classifier)
    again = ReferenceStatsCache(tmp_path).get(counting, "fashion-mnist/test", images)

    assert counting.featurized == 100
    np.testing.assert_allclose(again.mu, good.mu)
    assert str(path) in caplog.text and "computing them again" in caplog.text
    reread = ReferenceStats.load(path)
    assert reread.count == 100 and np.isfinite(reread.mu).all()


def test_a_cache_folder_that_cannot_be_written_keeps_the_statistics_in_memory(classifier, test_subset, tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    cache = ReferenceStatsCache(blocked / "reference")

    first = cache.get(classifier, "fashion-mnist/test", test_subset[0][:50])

    assert cache.get(classifier, "fashion-mnist/test", test_subset[0][:50]) is first
    assert "stay in this process only" in caplog.text and str(blocked) in caplog.text


def test_the_default_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "feddiff"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "feddiff"


def test_reference_from_another_extractor_is_refused(classifier, reference, test_subset):
    other = ReferenceStats(extractor="inception-v3-fid:000000000000", dataset="x", count=2, mu=reference.mu, sigma=reference.sigma)

    with pytest.raises(ValueError, match="computed with"):
        other.frechet_distance_to(classifier, test_subset[0][:4])


# ---------------------------------------------------------------------------------------------------------
# Inception-v3 (random weights: the architecture and the key names, not the published features)


def test_inception_parameter_count_matches_torchvision():
    # torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and with the TF
    # graph's 1008-way fc (+16,392) that is 23,850,960.
    assert sum(p.numel() for p in FIDInceptionV3().parameters()) == 23_850_960


def test_inception_loads_a_pytorch_fid_state_dict(tmp_path):
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in FIDInceptionV3().state_dict().items()}
    save_file(state, tmp_path / "inception.safetensors")
    torch.save(state, tmp_path / "pt_inception.pth")
    images = torch.rand((2, 1, 28, 28), generator=torch.Generator().manual_seed(0)) * 2 - 1

    from_safetensors = load_inception(tmp_path / "inception.safetensors")
    from_pth = load_inception(tmp_path / "pt_inception.pth")
    features = from_safetensors.features(images)

    assert "Conv2d_1a_3x3.bn.running_var" in state and "Mixed_7c.branch3x3dbl_3b.conv.weight" in state
    assert state["fc.weight"].shape == (1008, FID_FEATURE_DIM)
    assert features.shape == (2, FID_FEATURE_DIM) and from_safetensors.dim == FID_FEATURE_DIM
    assert torch.isfinite(features).all()
    torch.testing.assert_close(from_pth.network.state_dict()["fc.weight"], state["fc.weight"])


def test_inception_refuses_a_foreign_state_dict(tmp_path):
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "resnet.safetensors")

    with pytest.raises(ValueError, match="not a pytorch-fid Inception-v3"):
        load_inception(tmp_path / "resnet.safetensors")


def _reshaped_inception(path: Path) -> None:
    state = {k: v.contiguous() for k, v in FIDInceptionV3().state_dict().items()}
    state["fc.weight"] = torch.zeros(10, FID_FEATURE_DIM)  # a 10-way head in place of the 1008-way one
    save_file(state, path)


@pytest.mark.parametrize(
    ("name", "write", "why"),
    [
        ("notes.pth", lambda p: p.write_text("my notes"), "is not a torch state dict of tensors (UnpicklingError)"),
        ("junk.safetensors", lambda p: p.write_bytes(b"\x03\x00"), "is not a safetensors file"),
        ("resnet.safetensors", lambda p: save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, p), "is not a pytorch-fid Inception-v3 state dict: "),
        ("head.safetensors", _reshaped_inception, "is not a pytorch-fid Inception-v3 state dict: 1 tensors of other shapes (e.g. size mismatch for fc.weight"),
    ],
)
def test_inception_weights_that_are_not_the_network_are_refused_naming_the_flag_and_the_file(tmp_path, name, write, why):
    path = tmp_path / name
    write(path)

    with pytest.raises(ValueError) as refused:
        load_extractor(path)

    assert str(refused.value).startswith(f"--inception-weights: {str(path)!r} {why}"), refused.value


@pytest.mark.parametrize(
    ("every", "rounds"),
    [(0, []), (1, [1, 2, 3, 4, 5, 6]), (3, [1, 3, 6]), (5, [1, 5]), (10, [1])],
)
def test_fd_curves_start_after_round_one_then_every_n_rounds(every: int, rounds: list[int]) -> None:
    assert [r for r in range(7) if curve_point_due(r, every)] == rounds


def test_a_shared_grid_keeps_as_many_samples_as_fit_its_bound():
    """Noise compresses badly: 64 RGB samples of 64x64 take about 800 KB as a PNG grid, 16 about 200 KB."""
    from fedcore.evaluation.images import png_bytes, png_within

    noise = torch.rand(64, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sizes = {side: len(png_bytes(noise[: side * side], nrow=side)) for side in (8, 4, 2, 1)}

    assert png_within(noise, sizes[8]) == png_bytes(noise, nrow=8)
    assert png_within(noise, sizes[8] - 1) == png_bytes(noise[:16], nrow=4)
    assert png_within(noise, sizes[1]) == png_bytes(noise[:1], nrow=1)
    assert png_within(noise, sizes[1] - 1) == b""
