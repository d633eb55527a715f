"""Image datasets on disk: the IDX reader, Fashion-MNIST, image folders, and the model's [-1, 1] pixel range."""

from __future__ import annotations

import functools
import gzip
import io
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import torch
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

from fedcore.errors import DatasetError

DEFAULT_FASHION_MNIST_DIR: Final = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_DIR_ENV: Final = "FEDDIFF_FASHION_MNIST_DIR"  # overrides DEFAULT_FASHION_MNIST_DIR
FASHION_MNIST_PACKAGE: Final = "dataset-fashion-mnist"  # the Debian package that installs the IDX files
FASHION_MNIST_NUM_CLASSES: Final = 10
FASHION_MNIST_FILES: Final = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); data is big-endian.
_IDX_DTYPES: Final[MappingProxyType[int, np.dtype[Any]]] = MappingProxyType(
    {
        0x08: np.dtype(">u1"),
        0x09: np.dtype(">i1"),
        0x0B: np.dtype(">i2"),
        0x0C: np.dtype(">i4"),
        0x0D: np.dtype(">f4"),
        0x0E: np.dtype(">f8"),
    }
)
# Image folders: the files read (any case), and how each Pillow mode reaches the model's channels.
IMAGE_SUFFIXES: Final = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp")
_CHANNEL_MODES: Final = MappingProxyType({1: "L", 3: "RGB"})
# Integer grayscale is scaled by the full range of the sample type the file stores, which is what an integer
# sample means in both formats that carry one: PNG scales samples of fewer significant bits up to the bit depth
# (PNG spec, 12.5 "Sample depth scaling"; sBIT only informs), and TIFF's MaxSampleValue "is not to be used to
# affect the visual appearance of an image" (TIFF 6.0, tag 281). Unsigned n bits: 0 .. 2^n - 1 to 0 .. 255;
# signed 16-bit (TIFF SampleFormat 2, which Pillow opens in mode "I"): -32768 .. 32767 to 0 .. 255, so that 0
# is mid-grey. Keyed by Pillow's raw mode (the stored type), as its mode "I" holds several.
_INTEGER_SAMPLES: Final = MappingProxyType(
    {
        "I;16": (0, 65535), "I;16L": (0, 65535), "I;16B": (0, 65535), "I;16N": (0, 65535), "I;16R": (0, 65535),
        "I;16S": (-32768, 32767), "I;16BS": (-32768, 32767),
        "I;12": (0, 4095),  # a TIFF of 12 bits per sample, which Pillow opens in mode "I;16" unscaled
    }
)  # fmt: skip
# Samples whose files state no value range (counts, Hounsfield units, linear radiance, [0, 1] floats ...):
# refused rather than guessed, since per-image min/max scaling would re-expose every image differently.
_UNKNOWN_RANGE_SAMPLES: Final = MappingProxyType(
    {
        "I;32S": "32-bit signed integer samples", "I;32BS": "32-bit signed integer samples", "I;32N": "32-bit signed integer samples",
        "I;32": "32-bit integer samples", "I": "32-bit integer samples",
        "F;32F": "32-bit floating-point samples", "F;32BF": "32-bit floating-point samples", "F": "32-bit floating-point samples",
    }
)  # fmt: skip
_ALPHA_MODES: Final = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_ICC_MODES: Final = frozenset({"RGB", "RGBA", "CMYK"})  # converted to sRGB when they embed an ICC profile
ALPHA_BACKGROUND: Final = 0  # transparent pixels are composited over black (docs/reliability.md, image folders)
_LISTED_PROBLEMS: Final = 10  # files named in the error about an image folder; the rest are counted


# ---------------------------------------------------------------------------------------------------------
# IDX files


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped when the name ends in .gz) into an array of native byte order.

    Layout: two zero bytes, a type code byte, the number of dimensions, then one big-endian int32 per
    dimension, then the values in C order. The array has the shape the header declares and the dtype its
    type code names (uint8 for Fashion-MNIST's images (N, 28, 28) and labels (N,)). DatasetError, naming the
    file, when it is missing or unreadable, its magic or type code is wrong, or its size does not match the
    header.
    """
    path = Path(path)
    raw = _idx_bytes(path)
    dtype, ndim = _idx_magic(raw, path)
    shape = _idx_shape(raw, ndim, path)
    return _idx_values(raw, dtype, shape, path)


def _idx_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when its name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError as e:
        raise DatasetError(f"IDX file {str(path)!r} does not exist") from e
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"IDX file {str(path)!r} cannot be read: {e}") from e


def _idx_magic(raw: bytes, path: Path) -> tuple[np.dtype[Any], int]:
    """The value type and the number of dimensions that the 4-byte magic declares."""
    if len(raw) < 4:
        raise DatasetError(f"IDX file {str(path)!r} is {len(raw)} bytes long, shorter than the 4-byte magic")
    if raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"IDX file {str(path)!r} has magic {raw[:4].hex()!r}, expected it to start with '0000'")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise DatasetError(f"IDX file {str(path)!r} has unknown type code 0x{type_code:02X}")
    if ndim == 0:
        raise DatasetError(f"IDX file {str(path)!r} has 0 dimensions")
    return _IDX_DTYPES[type_code], ndim


def _idx_shape(raw: bytes, ndim: int, path: Path) -> tuple[int, ...]:
    """The shape: one big-endian int32 per dimension after the magic."""
    if len(raw) < 4 + 4 * ndim:
        raise DatasetError(f"IDX file {str(path)!r} is {len(raw)} bytes long, too short for the header of {ndim} dimensions")
    return tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))


def _idx_values(raw: bytes, dtype: np.dtype[Any], shape: tuple[int, ...], path: Path) -> np.ndarray:
    """The values after the header, checked to fill `shape` exactly, in native byte order."""
    header_len = 4 + 4 * len(shape)
    expected = math.prod(shape) * dtype.itemsize
    payload = len(raw) - header_len
    if payload != expected:
        raise DatasetError(f"IDX file {str(path)!r} has {payload} payload bytes, expected {expected} for shape {shape} of {dtype.name}")
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
            raise ValueError(f"images have shape {self.images.shape} and dtype {self.images.dtype}, expected (N, C, H, W) uint8")
        if self.labels is not None and self.labels.shape != (len(self.images),):
            raise ValueError(f"labels have shape {self.labels.shape}, expected ({len(self.images)},)")

    def __len__(self) -> int:
        return len(self.images)

    def class_labels(self) -> np.ndarray:
        """The labels, for what needs the classes (the splits); DatasetError for images without them."""
        if self.labels is None:
            raise DatasetError(f"these {len(self)} images have no class labels (an image folder): a split needs a labelled dataset")
        return self.labels

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


def _find_idx(directory: Path, stem: str, flag: str) -> Path:
    """directory/stem.gz, else directory/stem; DatasetError naming the folder, the files expected there and the
    two ways to name the data root (`flag`, the environment variable) when neither is a file."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    missing = f"{stem}.gz not found in {str(directory)!r}" if directory.is_dir() else f"{str(directory)!r} not found"
    raise DatasetError(
        f"Fashion-MNIST: {missing} (the data root: {flag} or {FASHION_MNIST_DIR_ENV}); expected its four IDX "
        f"files there ({', '.join(f'{name}.gz' for name in FASHION_MNIST_FILES)}, or unzipped): install them with "
        f"'apt-get install {FASHION_MNIST_PACKAGE}', or give a folder holding them"
    )


def fashion_mnist_files(train: bool = True, root: Path | str | None = None, *, flag: str = "--data-root") -> tuple[Path, Path]:
    """The IDX files of Fashion-MNIST's training or test images and labels (`fashion_mnist_dir`); DatasetError,
    saying how to install them or name their folder (`flag`, the command's flag for `root`), when one is missing."""
    directory = fashion_mnist_dir(root)
    prefix = "train" if train else "t10k"
    return _find_idx(directory, f"{prefix}-images-idx3-ubyte", flag), _find_idx(directory, f"{prefix}-labels-idx1-ubyte", flag)


def load_fashion_mnist(train: bool = True, root: Path | str | None = None) -> ImageDataset:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 training or 10,000 test images, (N, 1, 28, 28) uint8."""
    images_path, labels_path = fashion_mnist_files(train, root)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DatasetError(f"{str(images_path)!r} holds {images.dtype} of shape {images.shape}, expected uint8 (N, 28, 28)")
    if labels.shape != (len(images),):
        raise DatasetError(f"{str(labels_path)!r} holds shape {labels.shape}, expected ({len(images)},)")
    if labels.size and (labels.min() < 0 or labels.max() >= FASHION_MNIST_NUM_CLASSES):
        raise DatasetError(f"{str(labels_path)!r} holds labels in [{labels.min()}, {labels.max()}], expected [0, 9]")
    # (N, 28, 28) -> (N, 1, 28, 28)
    return ImageDataset(images=images[:, None], labels=labels.astype(np.int64))


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _to_srgb(image: Image.Image) -> Image.Image:
    """A colour image with an embedded ICC profile (a CMYK print file, a Display P3 or Adobe RGB photo) in
    sRGB; without one, or with one LittleCMS cannot use, the pixels are taken as sRGB (as browsers do)."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in _ICC_MODES:
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        converted = ImageCms.profileToProfile(image, source, _srgb_profile(), outputMode="RGBA" if image.mode == "RGBA" else "RGB")
    except (OSError, ImageCms.PyCMSError):
        return image
    assert converted is not None  # profileToProfile returns None only with inPlace=True
    return converted


def _flatten(image: Image.Image, mode: str) -> Image.Image:
    """An image of 8 bits per sample in `mode` ("L" or "RGB"): colour profile applied, other colour spaces
    (CMYK, YCbCr, LAB, HSV, palettes, 1-bit) converted by Pillow, and transparency (an alpha channel or a
    tRNS colour key) composited over ALPHA_BACKGROUND."""
    image = _to_srgb(image)
    if image.mode == "La":  # premultiplied; Pillow converts it to LA only
        image = image.convert("LA")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (ALPHA_BACKGROUND, ALPHA_BACKGROUND, ALPHA_BACKGROUND, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")  # every mode converts to RGB (LAB to nothing else)
    return image.convert(mode)


def _stored_samples(image: Image.Image) -> str:
    """The sample type an opened integer or float image stores (Pillow's raw mode: "I;16S" for a signed 16-bit
    TIFF that Pillow opens in mode "I", "I;12" for a 12-bit one it opens in mode "I;16"); its mode for any other
    image."""
    if (image.mode in ("I", "F") or image.mode.startswith("I;16")) and isinstance(image, ImageFile.ImageFile) and image.tile:
        args = image.tile[0].args
        return str(args[0] if isinstance(args, tuple) else args)
    return image.mode


def _integer_plane(image: Image.Image, low: int, high: int) -> Image.Image:
    """Integer grayscale as a float image in [0, 255], by its sample type's range low..high; samples equal to
    a tRNS key are transparent and become ALPHA_BACKGROUND."""
    values = np.asarray(image)  # (H, W) uint16 in the file's byte order, or int32 (mode "I")
    plane = (values.astype(np.float32) - np.float32(low)) * np.float32(255 / (high - low))
    key = image.info.get("transparency")
    if isinstance(key, int):
        plane[values == key] = ALPHA_BACKGROUND
    return Image.fromarray(plane)  # mode "F"


def _square(image: Image.Image, image_size: int) -> Image.Image:
    """Center-cropped to a square, then resized to image_size (Lanczos)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _pixels(image: Image.Image, image_size: int, channels: int, samples: str) -> np.ndarray:
    """An opened image whose samples (`_stored_samples`) are not refused as (channels, image_size, image_size) uint8."""
    if samples in _INTEGER_SAMPLES:
        plane = np.asarray(_square(_integer_plane(image, *_INTEGER_SAMPLES[samples]), image_size))
        # (H, W) float -> (channels, H, W) uint8; Lanczos may ring past the range, hence the clip
        return np.repeat(np.clip(np.rint(plane), 0, 255).astype(np.uint8)[None], channels, axis=0)
    pixels = np.asarray(_square(_flatten(image, _CHANNEL_MODES[channels]), image_size), dtype=np.uint8)
    # (H, W) -> (1, H, W);  (H, W, C) -> (C, H, W)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _load_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One image file (its first frame) as (channels, image_size, image_size) uint8 pixels; DatasetError
    names the file and why it cannot be used."""
    try:
        with Image.open(path) as opened:
            samples = _stored_samples(opened)  # before the EXIF turn, which makes a new image
            if samples in _UNKNOWN_RANGE_SAMPLES or (opened.mode in ("I", "F") and samples not in _INTEGER_SAMPLES):
                stored = _UNKNOWN_RANGE_SAMPLES.get(samples, f"samples stored as {samples!r}")
                raise DatasetError(
                    f"{str(path)!r} has mode {opened.mode!r} ({stored}), whose value range the file does not state; "
                    "convert it to 8- or 16-bit with the range you mean"
                )
            # Oriented as a camera's EXIF tag says the image is viewed.
            return _pixels(ImageOps.exif_transpose(opened), image_size, channels, samples)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{str(path)!r} cannot be read: {e}") from e


def load_image_folder(path: Path | str, image_size: int, channels: int) -> ImageDataset:
    """Every image file under `path` (IMAGE_SUFFIXES, recursively, in sorted path order) in the model's
    channels, center-cropped to a square and resized to `image_size`: unlabeled (N, channels, image_size,
    image_size) uint8, which `to_model_range` maps to [-1, 1].

    Every mode Pillow opens is converted (16-bit grayscale, unsigned or signed, by its sample type's range;
    palettes, 1-bit, CMYK, YCbCr, LAB; colour through its ICC profile; transparency over ALPHA_BACKGROUND),
    except 32-bit integer and float images, whose range is unknown: a DatasetError names every file that is refused or
    unreadable, before any training."""
    if channels not in _CHANNEL_MODES:
        raise ValueError(f"channels is {channels}, expected 1 (grayscale) or 3 (RGB)")
    if image_size < 1:
        raise ValueError(f"image_size is {image_size}, expected >= 1")
    directory = Path(path)
    if not directory.is_dir():
        raise DatasetError(f"image folder {str(directory)!r} does not exist or is not a directory")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(f"image folder {str(directory)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    _check_fits_in_memory(len(files), channels, image_size, directory)
    images, problems = [], []
    for f in files:
        try:
            images.append(_load_image(f, image_size, channels))
        except DatasetError as e:
            problems.append(str(e))
    if problems:
        listed = "".join(f"\n  {p}" for p in problems[:_LISTED_PROBLEMS])
        more = f"\n  ... and {len(problems) - _LISTED_PROBLEMS} more" if len(problems) > _LISTED_PROBLEMS else ""
        raise DatasetError(f"image folder {str(directory)!r}: {len(problems)} of {len(files)} images cannot be used:{listed}{more}")
    return ImageDataset(images=np.stack(images), labels=None)


def _check_fits_in_memory(count: int, channels: int, image_size: int, directory: Path) -> None:
    """DatasetError when `count` images of (channels, image_size, image_size) uint8, held twice while they are
    stacked, exceed the memory available now: said before the first image is resized, not by the kernel."""
    needed = 2 * count * channels * image_size * image_size
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > available:
        raise DatasetError(
            f"image folder {str(directory)!r}: {count} images at image_size {image_size} ({channels} channel(s)) need "
            f"{needed / 2**30:.1f} GiB to load and {available / 2**30:.1f} GiB is available: lower image_size or use fewer images"
        )


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
