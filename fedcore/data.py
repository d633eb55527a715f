"""Image datasets on disk: the IDX reader, Fashion-MNIST, image folders, and the model's [-1, 1] pixel range."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

DEFAULT_FASHION_MNIST_DIR: Final = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_DIR_ENV: Final = "FEDDIFF_FASHION_MNIST_DIR"  # overrides DEFAULT_FASHION_MNIST_DIR
FASHION_MNIST_PACKAGE: Final = "dataset-fashion-mnist"  # the Debian package that installs the IDX files
FASHION_MNIST_NUM_CLASSES: Final = 10

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); data is big-endian.
_IDX_DTYPES: Final = MappingProxyType({
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
})
_IMAGE_SUFFIXES: Final = frozenset({".png", ".jpg", ".jpeg"})
_CHANNEL_MODES: Final = MappingProxyType({1: "L", 3: "RGB"})


class DatasetError(ValueError):
    """A dataset is missing on disk or its files are malformed."""


# ---------------------------------------------------------------------------------------------------------
# IDX files


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped when the name ends in .gz) into an array of native byte order.

    Layout: two zero bytes, a type code byte, the number of dimensions, then one big-endian int32 per
    dimension, then the values in C order.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError as e:
        raise DatasetError(f"IDX file {str(path)!r} does not exist") from e
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"IDX file {str(path)!r} cannot be read: {e}") from e

    if len(raw) < 4:
        raise DatasetError(f"IDX file {str(path)!r} is {len(raw)} bytes long, shorter than the 4-byte magic")
    if raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"IDX file {str(path)!r} has magic {raw[:4].hex()!r}, expected it to start with '0000'")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise DatasetError(f"IDX file {str(path)!r} has unknown type code 0x{type_code:02X}")
    if ndim == 0:
        raise DatasetError(f"IDX file {str(path)!r} has 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DatasetError(
            f"IDX file {str(path)!r} is {len(raw)} bytes long, too short for the header of {ndim} dimensions"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = math.prod(shape) * dtype.itemsize
    payload = len(raw) - header_len
    if payload != expected:
        raise DatasetError(
            f"IDX file {str(path)!r} has {payload} payload bytes, "
            f"expected {expected} for shape {shape} of {dtype.name}"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header_len)
    return values.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


# ---------------------------------------------------------------------------------------------------------
# Datasets


@dataclass(frozen=True, eq=False)
class ImageDataset:
    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray | None  # (N,) int64; None for unlabeled image folders

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images have shape {self.images.shape} and dtype {self.images.dtype}, expected (N, C, H, W) uint8"
            )
        if self.labels is not None and self.labels.shape != (len(self.images),):
            raise ValueError(f"labels have shape {self.labels.shape}, expected ({len(self.images)},)")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: np.ndarray) -> ImageDataset:
        """The images (and labels) at `indices`, in that order: one client's share of a split."""
        indices = np.asarray(indices, dtype=np.int64)
        labels = None if self.labels is None else self.labels[indices]
        return ImageDataset(images=self.images[indices], labels=labels)


def fashion_mnist_dir(root: Path | str | None = None) -> Path:
    """Where the Fashion-MNIST IDX files live: `root`, else $FEDDIFF_FASHION_MNIST_DIR, else the default."""
    if root is not None:
        return Path(root)
    from_env = os.environ.get(FASHION_MNIST_DIR_ENV)
    return Path(from_env) if from_env else DEFAULT_FASHION_MNIST_DIR


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise DatasetError(
        f"Fashion-MNIST file {str(directory / (stem + '.gz'))!r} not found. Install it with "
        f"'apt-get install {FASHION_MNIST_PACKAGE}', or point {FASHION_MNIST_DIR_ENV} (or root=) at a "
        f"directory holding the IDX files"
    )


def load_fashion_mnist(train: bool = True, root: Path | str | None = None) -> ImageDataset:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 training or 10,000 test images, (N, 1, 28, 28) uint8."""
    directory = fashion_mnist_dir(root)
    prefix = "train" if train else "t10k"
    images_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DatasetError(
            f"{str(images_path)!r} holds {images.dtype} of shape {images.shape}, expected uint8 (N, 28, 28)"
        )
    if labels.shape != (len(images),):
        raise DatasetError(f"{str(labels_path)!r} holds shape {labels.shape}, expected ({len(images)},)")
    if labels.size and (labels.min() < 0 or labels.max() >= FASHION_MNIST_NUM_CLASSES):
        raise DatasetError(
            f"{str(labels_path)!r} holds labels in [{labels.min()}, {labels.max()}], expected [0, 9]"
        )
    # (N, 28, 28) -> (N, 1, 28, 28)
    return ImageDataset(images=images[:, None], labels=labels.astype(np.int64))


def _load_image(path: Path, image_size: int, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            width, height = image.size
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            image = image.crop((left, top, left + side, top + side))
            image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise DatasetError(f"image {str(path)!r} cannot be read: {e}") from e
    # (H, W) -> (1, H, W);  (H, W, C) -> (C, H, W)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def load_image_folder(path: Path | str, image_size: int, channels: int) -> ImageDataset:
    """All PNG/JPEG files under `path` (recursively, in sorted path order), center-cropped to a square and
    resized to `image_size`, as unlabeled (N, channels, image_size, image_size) uint8."""
    if channels not in _CHANNEL_MODES:
        raise ValueError(f"channels is {channels}, expected 1 (grayscale) or 3 (RGB)")
    if image_size < 1:
        raise ValueError(f"image_size is {image_size}, expected >= 1")
    directory = Path(path)
    if not directory.is_dir():
        raise DatasetError(f"image folder {str(directory)!r} does not exist or is not a directory")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(f"image folder {str(directory)!r} holds no PNG or JPEG files")
    mode = _CHANNEL_MODES[channels]
    images = np.stack([_load_image(f, image_size, mode) for f in files])
    return ImageDataset(images=images, labels=None)


# ---------------------------------------------------------------------------------------------------------
# Pixel ranges


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels (N, C, H, W) in [0, 255] -> float32 in [-1, 1] (x / 127.5 - 1), as DDPM trains on."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images if images.flags.writeable else images.copy())
    if images.dtype != torch.uint8:
        raise ValueError(f"images have dtype {images.dtype}, expected uint8")
    return images.to(torch.float32) / 127.5 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] (clamped) -> uint8 pixels in [0, 255], rounded to the nearest integer."""
    return ((x.detach().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
