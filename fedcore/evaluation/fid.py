"""Frechet distance between generated and real images, on the features of a `FeatureExtractor` (extractors.py).

FD (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule", eq. 6): for Gaussians fitted to two
feature sets, d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}). The formula and its numerical
guards follow pytorch-fid's `calculate_frechet_distance`; the matrix square root is scipy's `sqrtm`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

import numpy as np
import torch

from fedcore.atomic import atomic_write
from fedcore.evaluation.extractors import FeatureExtractor
from fedcore.model.denoiser import Denoiser
from fedcore.model.diffusion import SamplingProgress, SamplingSpec, Schedule
from fedcore.model.diffusion import sample as generate

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Statistics and the distance


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D)."""
    x = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    x = x.astype(np.float64, copy=False)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features have shape {x.shape}, expected (N, D) with N >= 2")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6).

    As pytorch-fid: if sqrtm(sigma1 @ sigma2) is not finite (near-singular product), retry with eps added to
    both diagonals; imaginary parts from rounding are dropped when small and raise when not.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"means have shapes {mu1.shape} and {mu2.shape}, expected equal")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"covariances have shapes {sigma1.shape} and {sigma2.shape}, expected {(mu1.shape[0],) * 2}")
    from scipy import linalg  # here, not at import: every worker and coordinator imports this module, few use it

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------------------
# Reference statistics of the real data


@dataclass(frozen=True)
class ReferenceStats:
    """Feature statistics of a real dataset, computed once and compared against many generated sets."""

    extractor: str  # FeatureExtractor.name the statistics were computed with
    dataset: str  # what the images were, e.g. "fashion-mnist/train"
    count: int  # number of images
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64

    @classmethod
    def compute(cls, extractor: FeatureExtractor, images: torch.Tensor, dataset: str, batch_size: int | None = None) -> ReferenceStats:
        mu, sigma = feature_statistics(extractor.features(images, batch_size))
        return cls(extractor=extractor.name, dataset=dataset, count=len(images), mu=mu, sigma=sigma)

    def frechet_distance_to(self, extractor: FeatureExtractor, images: torch.Tensor, batch_size: int | None = None) -> float:
        """FD between `images` (N, C, H, W) in [-1, 1] and this reference, on the same extractor."""
        if extractor.name != self.extractor:
            raise ValueError(f"reference was computed with {self.extractor!r}, not {extractor.name!r}")
        mu, sigma = feature_statistics(extractor.features(images, batch_size))
        return frechet_distance(mu, sigma, self.mu, self.sigma)

    def save(self, path: Path | str | BinaryIO) -> None:
        np.savez(
            path, mu=self.mu, sigma=self.sigma, extractor=np.array(self.extractor),
            dataset=np.array(self.dataset), count=np.array(self.count),
        )  # fmt: skip

    @classmethod
    def load(cls, path: Path | str) -> ReferenceStats:
        with np.load(path, allow_pickle=False) as f:
            return cls(
                extractor=str(f["extractor"]), dataset=str(f["dataset"]), count=int(f["count"]),
                mu=f["mu"].astype(np.float64), sigma=f["sigma"].astype(np.float64),
            )  # fmt: skip


CACHE_DIR_ENV: Final = "FEDDIFF_CACHE_DIR"  # where reference statistics persist; default: the user's cache folder


def default_cache_dir() -> Path:
    """Where reference statistics persist between processes: $FEDDIFF_CACHE_DIR, else $XDG_CACHE_HOME/feddiff,
    else ~/.cache/feddiff (the XDG base directory default)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache") / "feddiff"


def images_digest(images: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of the images' values, shape and dtype: what a cached statistic is of."""
    x = images.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(x.shape)}:{x.dtype}".encode())
    h.update(x.numpy().tobytes())
    return h.hexdigest()[:16]


class ReferenceStatsCache:
    """Owns the reference statistics of image sets: computed on first use, then reused.

    Statistics are keyed by the extractor's name (network and weights), the dataset's name and a digest of the
    images themselves, so a changed dataset or extractor never gets another one's statistics. With
    `directory`, they also persist as `<extractor>__<dataset>__<digest>.npz` files, written atomically, for
    every later process; a file that cannot be read or does not match its key is computed again and replaced,
    and a directory that cannot be written is logged once and used as an in-memory cache only.
    """

    def __init__(self, directory: Path | str | None = None):
        self._directory = Path(directory) if directory is not None else None
        self._stats: dict[tuple[str, str, str], ReferenceStats] = {}

    @classmethod
    def default(cls) -> ReferenceStatsCache:
        """The cache in `default_cache_dir()`/reference, shared by every process of the user."""
        return cls(default_cache_dir() / "reference")

    def _path(self, key: tuple[str, str, str]) -> Path | None:
        if self._directory is None:
            return None
        stem = "__".join(key).replace("/", "-").replace(":", "-")
        return self._directory / f"{stem}.npz"

    def get(self, extractor: FeatureExtractor, dataset: str, images: torch.Tensor, batch_size: int | None = None) -> ReferenceStats:
        """The statistics of `images` (N, C, H, W) in [-1, 1], named `dataset`, on `extractor`'s features."""
        key = (extractor.name, dataset, images_digest(images))
        if key in self._stats:
            return self._stats[key]
        path = self._path(key)
        stats = self._load(path, extractor, dataset, len(images)) if path is not None else None
        if stats is None:
            stats = ReferenceStats.compute(extractor, images, dataset, batch_size)
            if path is not None:
                self._save(stats, path)
        self._stats[key] = stats
        return stats

    @staticmethod
    def _load(path: Path, extractor: FeatureExtractor, dataset: str, count: int) -> ReferenceStats | None:
        """The statistics in `path` when they are those of the key; None (computed again) when not there or not."""
        if not path.is_file():
            return None
        try:
            stats = ReferenceStats.load(path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            log.warning("reference statistics %s cannot be read (%s): computing them again", path, e)
            return None
        dim = extractor.dim
        if (
            (stats.extractor, stats.dataset, stats.count) != (extractor.name, dataset, count)
            or stats.mu.shape != (dim,)
            or stats.sigma.shape != (dim, dim)
            or not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all())
        ):
            log.warning("reference statistics %s are not those of %s (%d images, %s): computing them again", path, dataset, count, extractor.name)
            return None
        return stats

    def _save(self, stats: ReferenceStats, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, stats.save)
        except OSError as e:
            log.warning("reference statistics cannot be kept in %s (%s): they stay in this process only", path.parent, e.strerror or e)
            self._directory = None


# ---------------------------------------------------------------------------------------------------------
# Scoring a generator: sample, then FD against a reference


def curve_point_due(completed_rounds: int, every: int) -> bool:
    """Whether an FD curve gets a point after `completed_rounds`: after round 1, where every curve starts, and
    every `every` rounds (0: no curve; the last round is scored by the caller in any case)."""
    return every > 0 and completed_rounds > 0 and (completed_rounds == 1 or completed_rounds % every == 0)


@dataclass(frozen=True)
class GeneratorScore:
    fd: float
    samples: torch.Tensor  # (n, C, H, W) in [-1, 1], on the CPU
    extractor: str  # FeatureExtractor.name
    spec: SamplingSpec


def score_generator(
    model: Denoiser,
    reference: ReferenceStats,
    extractor: FeatureExtractor,
    spec: SamplingSpec,
    *,
    device: torch.device | str = "cpu",
    schedule: Schedule | None = None,
    on_step: SamplingProgress | None = None,
) -> GeneratorScore:
    """Sample `spec.num_samples` images from `model` and measure their FD to `reference`; `on_step` as in
    fedcore.model.diffusion.sample."""
    samples = generate(model, schedule or Schedule(), spec.num_samples, sampler=spec.sampler, steps=spec.steps, seed=spec.seed, device=device, on_step=on_step)
    fd = reference.frechet_distance_to(extractor, samples)
    return GeneratorScore(fd=fd, samples=samples, extractor=extractor.name, spec=spec)


def uniform_noise_fd(reference: ReferenceStats, extractor: FeatureExtractor, n: int, shape: tuple[int, ...], generator: torch.Generator) -> float:
    """The FD of n images of uniform noise in [-1, 1], each of `shape` (C, H, W), to `reference`: the top of the
    scale, where a model that learned nothing scores, for as many images as the samples it is set beside (FD
    falls as the sample count grows, so only counts that are equal compare)."""
    noise = torch.rand((n, *shape), generator=generator) * 2 - 1
    return reference.frechet_distance_to(extractor, noise)


def fashion_mnist_reference(extractor: FeatureExtractor, *, root: str | Path | None = None, cache: ReferenceStatsCache | None = None) -> ReferenceStats:
    """Statistics of the 10,000 Fashion-MNIST test images (the real images every model is compared with), from
    `cache` (default: the user's, `ReferenceStatsCache.default()`), computed there on its first use."""
    from fedcore.data.datasets import load_fashion_mnist, to_model_range

    cache = cache or ReferenceStatsCache.default()
    return cache.get(extractor, "fashion-mnist/test", to_model_range(load_fashion_mnist(train=False, root=root).images))
