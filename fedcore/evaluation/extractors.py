"""The feature networks the Frechet distance is measured on: a pinned Fashion-MNIST CNN or Inception-v3.

- `load_fmnist_classifier`: the project's own small CNN (trained by tools/train_fd_classifier.py), whose
  weights are committed in fedcore/evaluation/assets/ with their sha256, so every run on every machine
  measures with the same features. 28x28 inputs, 128-d features, cheap on CPU.
- `load_inception`: the pytorch-fid Inception-v3 (fedcore/evaluation/inception.py), from a weights file the
  user supplies; never downloaded. Numbers comparable to published FIDs only in the loose sense that the
  feature network is the same; Fashion-MNIST is far from ImageNet.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from fedcore.errors import AssetIntegrityError
from fedcore.evaluation.inception import FID_FEATURE_DIM, FIDInceptionV3

ASSET_DIR = Path(__file__).parent / "assets"
CLASSIFIER_WEIGHTS = "fmnist_classifier.safetensors"  # file name inside the asset directory
CLASSIFIER_MANIFEST = "fmnist_classifier.json"  # {"sha256", "test_accuracy", "epochs", "seed", ...}


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The Fashion-MNIST classifier


class FMNISTClassifier(nn.Module):
    """conv32-conv32-pool-conv64-conv64-pool-fc128-fc10 with BatchNorm; inputs (B, 1, 28, 28) in [-1, 1].

    The FD features are the fc128 outputs before their ReLU: after it, about a quarter of the units are zero
    on every test image, which would make the feature covariance singular.
    """

    feature_dim = 128
    num_classes = 10

    def __init__(self):
        super().__init__()

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.trunk = nn.Sequential(
            *conv(1, 32), *conv(32, 32), nn.MaxPool2d(2),  # (B, 32, 14, 14)
            *conv(32, 64), *conv(64, 64), nn.MaxPool2d(2),  # (B, 64, 7, 7)
            nn.Flatten(),  # (B, 3136)
            nn.Linear(64 * 7 * 7, self.feature_dim),  # (B, 128)
        )  # fmt: skip
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 1, 28, 28) -> (B, 128)
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 1, 28, 28) -> (B, 10) logits
        return self.head(self.dropout(F.relu(self.features(x))))


# ---------------------------------------------------------------------------------------------------------
# Feature extractors


class FeatureExtractor(Protocol):
    """Maps images in the model's range [-1, 1], (N, C, H, W), to features (N, dim) on the CPU."""

    name: str  # identifies the network and its weights; reference statistics are keyed by it
    dim: int  # feature width

    def features(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor: ...


@dataclass
class ModuleFeatureExtractor:
    """A `FeatureExtractor` around a network in eval mode; `embed` maps a batch on `device` to features."""

    name: str  # network and weights, e.g. "fmnist-cnn:8120e5f0dddc"
    dim: int  # feature width
    network: nn.Module  # in eval mode, on `device`
    embed: Callable[[torch.Tensor], torch.Tensor]  # (B, C, H, W) in [-1, 1] on `device` -> (B, dim)
    default_batch_size: int  # images per forward pass when the caller does not say
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        batch_size = self.default_batch_size if batch_size is None else batch_size
        if images.ndim != 4:
            raise ValueError(f"images have shape {tuple(images.shape)}, expected (N, C, H, W)")
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}, expected >= 1")
        self.network.eval()
        out = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(self.device, torch.float32)
            out.append(self.embed(batch).float().cpu())
        if not out:
            return torch.empty(0, self.dim)
        return torch.cat(out)  # (N, dim)


def load_fmnist_classifier(device: str | torch.device = "cpu", asset_dir: Path | str | None = None) -> ModuleFeatureExtractor:
    """The committed Fashion-MNIST CNN as a 128-d feature extractor, after checking its sha256."""
    directory = Path(asset_dir) if asset_dir is not None else ASSET_DIR
    weights_path, manifest_path = directory / CLASSIFIER_WEIGHTS, directory / CLASSIFIER_MANIFEST
    for path in (weights_path, manifest_path):
        if not path.is_file():
            raise FileNotFoundError(f"classifier asset {str(path)!r} is missing; run tools/train_fd_classifier.py to create it")
    manifest = json.loads(manifest_path.read_text())
    expected = manifest.get("sha256")
    actual = sha256_of_file(weights_path)
    if actual != expected:
        raise AssetIntegrityError(
            f"{str(weights_path)!r} has sha256 {actual}, but {str(manifest_path)!r} records {expected}; "
            "the weights were changed or corrupted (retrain with tools/train_fd_classifier.py)"
        )
    model = FMNISTClassifier()
    model.load_state_dict(load_file(weights_path, device="cpu"))
    device = torch.device(device)
    model.to(device).eval()
    return ModuleFeatureExtractor(
        name=f"fmnist-cnn:{actual[:12]}", dim=FMNISTClassifier.feature_dim, network=model,
        embed=model.features, default_batch_size=512, device=device,
    )  # fmt: skip


def _read_inception_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; ValueError naming it when it is neither a safetensors file nor a torch
    state dict (torch.load's errors for a file of other bytes are a KeyError, an UnpicklingError, ...)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(path, device="cpu")
        # The original pytorch-fid file is a pickle. It is a local file the user named on the command line, never
        # bytes from the network, and weights_only=True refuses anything but tensors and plain containers.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever a file of other bytes makes torch.load or safetensors raise
        kind = "a safetensors file" if path.suffix == ".safetensors" else "a torch state dict of tensors"
        raise ValueError(f"{str(path)!r} is not {kind} ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, expected a state dict")
    return state


def load_inception(weights_path: Path | str, device: str | torch.device = "cpu") -> ModuleFeatureExtractor:
    """pytorch-fid's Inception-v3 pool3 (2048-d) from `pt_inception-2015-12-05-6726825d.pth` or a safetensors copy.

    Images (N, 1 or 3, H, W) in [-1, 1] are repeated to RGB and resized to 299x299 bilinearly.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights {str(path)!r} not found; pass the pytorch-fid file pt_inception-2015-12-05-6726825d.pth (this project never downloads it)"
        )
    state = _read_inception_state_dict(path)
    model = FIDInceptionV3()
    wanted = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    given = {k for k in state if not k.endswith("num_batches_tracked")}
    if wanted != given:
        missing, unexpected = sorted(wanted - given), sorted(given - wanted)
        raise ValueError(
            f"{str(path)!r} is not a pytorch-fid Inception-v3 state dict: "
            f"{len(missing)} keys missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    try:
        model.load_state_dict(state, strict=False)  # strict on names (checked above) and, by torch, on shapes
    except RuntimeError as e:
        mismatch = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise ValueError(
            f"{str(path)!r} is not a pytorch-fid Inception-v3 state dict: {len(mismatch)} tensors of other shapes (e.g. {mismatch[0] if mismatch else e})"
        ) from None
    device = torch.device(device)
    model.to(device).eval()
    return ModuleFeatureExtractor(
        name=f"inception-v3-fid:{sha256_of_file(path)[:12]}", dim=FID_FEATURE_DIM, network=model,
        embed=model, default_batch_size=32, device=device,
    )  # fmt: skip


def load_extractor(inception_weights: Path | str | None, device: str | torch.device = "cpu") -> ModuleFeatureExtractor:
    """The features a Frechet distance is taken on: a user's pytorch-fid Inception weights (`load_inception`)
    when a file is given, else the bundled Fashion-MNIST classifier (`load_fmnist_classifier`). ValueError
    naming --inception-weights, the flag of every command that takes the file, and why, when it is not
    pytorch-fid's Inception-v3 weights."""
    if not inception_weights:
        return load_fmnist_classifier(device)
    try:
        return load_inception(inception_weights, device)
    except (OSError, ValueError) as e:
        raise ValueError(f"--inception-weights: {e}") from None


def check_inception_weights(inception_weights: Path | str) -> None:
    """Reads a user's Inception weights once, on the CPU, so that a command that scores models only later (after
    its training rounds) refuses a wrong file at its start; ValueError as `load_extractor`'s."""
    if inception_weights:
        load_extractor(inception_weights, "cpu")
