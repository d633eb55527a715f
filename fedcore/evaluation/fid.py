"""Frechet distance between generated and real images, on the features of a `FeatureExtractor` (extractors.py).

FD (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule", eq. 6): for Gaussians fitted to two
feature sets, d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}). The formula and its numerical
guards follow pytorch-fid's `calculate_frechet_distance`; the matrix square root is scipy's `sqrtm`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from fedcore.evaluation.extractors import FeatureExtractor
from fedcore.model.denoiser import Denoiser
from fedcore.model.diffusion import SamplingSpec, Schedule
from fedcore.model.diffusion import sample as generate

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

    def save(self, path: Path | str) -> None:
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


class ReferenceStatsCache:
    """Owns the reference statistics per (extractor, dataset): computed on first use, then reused.

    With `directory`, statistics also persist as `<extractor>__<dataset>.npz` files across processes.
    """

    def __init__(self, directory: Path | str | None = None):
        self._directory = Path(directory) if directory is not None else None
        self._stats: dict[tuple[str, str], ReferenceStats] = {}

    def _path(self, extractor: str, dataset: str) -> Path | None:
        if self._directory is None:
            return None
        stem = f"{extractor}__{dataset}".replace("/", "-").replace(":", "-")
        return self._directory / f"{stem}.npz"

    def get(
        self,
        extractor: FeatureExtractor,
        dataset: str,
        images: Callable[[], torch.Tensor],
        batch_size: int | None = None,
    ) -> ReferenceStats:
        """The statistics of `dataset`; `images()` (N, C, H, W) in [-1, 1] is called only on a miss."""
        key = (extractor.name, dataset)
        if key in self._stats:
            return self._stats[key]
        path = self._path(*key)
        if path is not None and path.is_file():
            stats = ReferenceStats.load(path)
        else:
            stats = ReferenceStats.compute(extractor, images(), dataset, batch_size)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                stats.save(path)
        self._stats[key] = stats
        return stats


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
) -> GeneratorScore:
    """Sample `spec.num_samples` images from `model` and measure their FD to `reference`."""
    samples = generate(model, schedule or Schedule(), spec.num_samples, sampler=spec.sampler, steps=spec.steps, seed=spec.seed, device=device)
    fd = reference.frechet_distance_to(extractor, samples)
    return GeneratorScore(fd=fd, samples=samples, extractor=extractor.name, spec=spec)


def fashion_mnist_reference(extractor: FeatureExtractor, *, root: str | Path | None = None, cache: ReferenceStatsCache | None = None) -> ReferenceStats:
    """Statistics of the 10,000 Fashion-MNIST test images (the real images every model is compared with)."""
    from fedcore.data.datasets import load_fashion_mnist, to_model_range

    cache = cache or ReferenceStatsCache()
    return cache.get(extractor, "fashion-mnist/test", lambda: to_model_range(load_fashion_mnist(train=False, root=root).images))
