"""Tests for fedcore.data.datasets: the IDX reader on the real Fashion-MNIST files, image folders, pixel ranges."""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from fedcore.data.datasets import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_DIR_ENV,
    IMAGE_SUFFIXES,
    ImageDataset,
    fashion_mnist_dir,
    fashion_mnist_files,
    from_model_range,
    load_fashion_mnist,
    load_image_folder,
    read_idx,
    to_model_range,
)
from fedcore.errors import DatasetError

needs_fashion_mnist = pytest.mark.skipif(
    not (DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def fashion_train() -> ImageDataset:
    return load_fashion_mnist(train=True, root=DEFAULT_FASHION_MNIST_DIR)


def _idx_bytes(array: np.ndarray, type_code: int) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


# --- IDX reader ----------------------------------------------------------------------------------------


@needs_fashion_mnist
def test_read_idx_real_train_files() -> None:
    images = read_idx(DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
    labels = read_idx(DEFAULT_FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")

    assert images.shape == (60_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60_000,)
    assert np.bincount(labels).tolist() == [6_000] * 10


@needs_fashion_mnist
def test_load_fashion_mnist_train_and_test(fashion_train: ImageDataset) -> None:
    test = load_fashion_mnist(train=False, root=DEFAULT_FASHION_MNIST_DIR)

    assert fashion_train.images.shape == (60_000, 1, 28, 28) and fashion_train.images.dtype == np.uint8
    assert fashion_train.labels is not None and fashion_train.labels.dtype == np.int64
    assert fashion_train.labels.min() == 0 and fashion_train.labels.max() == 9
    assert len(test) == 10_000 and test.images.shape[1:] == (1, 28, 28)
    assert test.labels is not None and set(np.unique(test.labels)) == set(range(10))


@pytest.mark.parametrize(
    ("dtype", "type_code"),
    [
        (np.uint8, 0x08),
        (np.int8, 0x09),
        (np.int16, 0x0B),
        (np.int32, 0x0C),
        (np.float32, 0x0D),
        (np.float64, 0x0E),
    ],
)
def test_read_idx_plain_roundtrip(tmp_path: Path, dtype: type, type_code: int) -> None:
    array: np.ndarray = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    path = tmp_path / "values-idx3"
    path.write_bytes(_idx_bytes(array, type_code))

    loaded = read_idx(path)

    assert loaded.dtype == np.dtype(dtype) and loaded.dtype.isnative
    np.testing.assert_array_equal(loaded, array)


def test_read_idx_gzip_roundtrip(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path = tmp_path / "values-idx2.gz"
    path.write_bytes(gzip.compress(_idx_bytes(array, 0x08)))

    np.testing.assert_array_equal(read_idx(path), array)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x00", "bytes long"),
        (b"\x01\x00\x08\x01" + struct.pack(">i", 2) + b"\x00\x00", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">i", 2) + b"\x00\x00", "0x07"),
        (b"\x00\x00\x08\x03" + struct.pack(">i", 2), "header"),
        (b"\x00\x00\x08\x02" + struct.pack(">2i", 2, 3) + b"\x00" * 5, "5 payload bytes, expected 6"),
        (b"\x00\x00\x08\x01" + struct.pack(">i", 2) + b"\x00" * 3, "3 payload bytes, expected 2"),
    ],
)
def test_read_idx_rejects_malformed(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad-idx"
    path.write_bytes(content)

    with pytest.raises(DatasetError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_truncated_gzip(tmp_path: Path) -> None:
    compressed = gzip.compress(_idx_bytes(np.zeros((50, 28, 28), dtype=np.uint8), 0x08))
    path = tmp_path / "truncated-idx3.gz"
    path.write_bytes(compressed[: len(compressed) // 2])

    with pytest.raises(DatasetError, match=r"truncated-idx3\.gz"):
        read_idx(path)


# --- Fashion-MNIST location ----------------------------------------------------------------------------


def test_missing_directory_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset-fashion-mnist") as info:
        load_fashion_mnist(root=tmp_path / "nowhere")
    assert FASHION_MNIST_DIR_ENV in str(info.value)
    assert str(info.value).startswith(f"Fashion-MNIST: {str(tmp_path / 'nowhere')!r} not found (the data root: --data-root or ")


def test_a_folder_without_the_files_is_named_with_the_files_expected_and_both_ways_to_name_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_fashion_mnist(root=tmp_path)

    assert str(info.value) == (
        f"Fashion-MNIST: train-images-idx3-ubyte.gz not found in {str(tmp_path)!r} (the data root: --data-root or "
        "FEDDIFF_FASHION_MNIST_DIR); expected its four IDX files there (train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz, or unzipped): install "
        "them with 'apt-get install dataset-fashion-mnist', or give a folder holding them"
    )


def test_a_missing_file_is_named_with_the_commands_flag(tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"")  # unzipped: found; the labels are not there

    with pytest.raises(DatasetError, match=r"^Fashion-MNIST: t10k-labels-idx1-ubyte\.gz not found in .* \(the data root: --eval-data-root or "):
        fashion_mnist_files(train=False, root=tmp_path, flag="--eval-data-root")


def test_directory_from_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(tmp_path))

    assert fashion_mnist_dir() == tmp_path
    assert fashion_mnist_dir(tmp_path / "explicit") == tmp_path / "explicit"
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_fashion_mnist(train=False)


def test_directory_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FASHION_MNIST_DIR_ENV, raising=False)

    assert fashion_mnist_dir() == DEFAULT_FASHION_MNIST_DIR


# --- ImageDataset --------------------------------------------------------------------------------------


def test_subset_keeps_images_and_labels_together() -> None:
    images = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1).repeat(2, axis=2)
    dataset = ImageDataset(images=images, labels=np.arange(5, dtype=np.int64) * 10)

    part = dataset.subset(np.array([4, 1]))

    assert len(part) == 2
    assert part.images[:, 0, 0, 0].tolist() == [4, 1]
    assert part.labels is not None and part.labels.tolist() == [40, 10]


def test_image_dataset_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="expected"):
        ImageDataset(images=np.zeros((2, 28, 28), dtype=np.uint8), labels=None)
    with pytest.raises(ValueError, match="labels have shape"):
        ImageDataset(images=np.zeros((2, 1, 28, 28), dtype=np.uint8), labels=np.zeros(3, dtype=np.int64))


# --- Image folders -------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    (tmp_path / "nested").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (28, 28), 128).save(tmp_path / "nested" / "b.png")
    Image.new("RGB", (17, 50), (0, 0, 255)).save(tmp_path / "c.JPG")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


@pytest.mark.parametrize("channels", [1, 3])
def test_load_image_folder(image_folder: Path, channels: int) -> None:
    dataset = load_image_folder(image_folder, image_size=28, channels=channels)

    assert dataset.images.shape == (3, channels, 28, 28) and dataset.images.dtype == np.uint8
    assert dataset.labels is None
    # Sorted paths: a.png (red), c.JPG (blue), nested/b.png (gray 128).
    centres = dataset.images[:, :, 14, 14]
    if channels == 3:
        assert centres[0].tolist() == [255, 0, 0]
        assert centres[1, 2] > 200 and centres[1, 0] < 50
        assert centres[2].tolist() == [128, 128, 128]
    else:
        assert centres[2, 0] == 128


def test_load_image_folder_empty_raises(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no image files \(\.png, \.jpg, \.jpeg, \.tif, \.tiff, \.webp, \.bmp\)"):
        load_image_folder(tmp_path, image_size=28, channels=1)
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere", image_size=28, channels=1)
    with pytest.raises(ValueError, match="channels is 2"):
        load_image_folder(tmp_path, image_size=28, channels=2)


def test_load_image_folder_unreadable_image(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")

    with pytest.raises(DatasetError, match=r"broken\.png"):
        load_image_folder(tmp_path, image_size=28, channels=1)


# --- Image folders: every mode Pillow writes ------------------------------------------------------------

SIDE = 16  # every test image is 16x16 and loaded at 16: no resampling, exact statistics


def _halves(mode: str, left: int | tuple[int, ...], right: int | tuple[int, ...], palette: list[int] | None = None) -> Image.Image:
    """Columns 0-7 `left`, 8-15 `right`."""
    if mode == "I;16":  # Image.paste writes 0 for a 16-bit value above 255 (Pillow 13)
        image = Image.new(mode, (SIDE, SIDE))
        image.frombytes(np.repeat(np.array([left, right], dtype="<u2"), SIDE // 2)[None].repeat(SIDE, axis=0).tobytes())
        return image
    image = Image.new(mode, (SIDE, SIDE), left)
    if palette is not None:
        image.putpalette(palette)
    image.paste(right, (SIDE // 2, 0, SIDE, SIDE))
    return image


def _ramp(mode: str, scale: int, dtype: str) -> Image.Image:
    """The 256 values 0, scale, 2*scale, ... row by row."""
    values = (np.arange(SIDE * SIDE) * scale).astype(dtype).reshape(SIDE, SIDE)
    image = Image.new(mode, (SIDE, SIDE))
    image.frombytes(values.tobytes())
    return image


def _swapped_primaries_profile() -> bytes:
    """Pillow's sRGB ICC profile with the red and blue primaries swapped: its red is sRGB's blue."""
    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    (count,) = struct.unpack_from(">I", profile, 128)
    entries = {struct.unpack_from(">4s", profile, 132 + 12 * i)[0]: 132 + 12 * i for i in range(count)}
    red, blue = profile[entries[b"rXYZ"] + 4 : entries[b"rXYZ"] + 12], profile[entries[b"bXYZ"] + 4 : entries[b"bXYZ"] + 12]
    profile[entries[b"rXYZ"] + 4 : entries[b"rXYZ"] + 12] = blue  # (offset, size) of the tag data
    profile[entries[b"bXYZ"] + 4 : entries[b"bXYZ"] + 12] = red
    profile[84:100] = bytes(16)  # the profile ID (an MD5 of the original) no longer applies
    return bytes(profile)


def _integer_tiff(path: Path, values: np.ndarray, *, signed: bool = False, bits: int = 16) -> None:
    """A baseline grayscale TIFF of `values` ((SIDE, SIDE) integers, 16-bit in their byte order, or 12-bit
    packed) with SampleFormat 2 (signed) or 1: Pillow writes neither signed 16-bit nor 12-bit TIFFs; scanners,
    microscopes, cameras and CT exports do."""
    order = b"MM" if values.dtype.byteorder == ">" else b"II"
    e = ">" if order == b"MM" else "<"
    if bits == 12:  # two samples in three bytes, most significant bits first
        flat = values.ravel().astype(np.uint32)
        data = np.stack([flat[0::2] >> 4, ((flat[0::2] & 0xF) << 4) | (flat[1::2] >> 8), flat[1::2] & 0xFF], axis=1).astype(np.uint8).tobytes()
    else:
        data = values.tobytes()
    tags = [(256, 3, SIDE), (257, 3, SIDE), (258, 3, bits), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1), (278, 3, SIDE),
            (279, 4, len(data)), (339, 3, 2 if signed else 1)]  # fmt: skip
    header = order + struct.pack(f"{e}HI", 42, 8 + len(data))
    ifd = struct.pack(f"{e}H", len(tags)) + b"".join(
        struct.pack(f"{e}HHI", tag, kind, 1) + (struct.pack(f"{e}HH", value, 0) if kind == 3 else struct.pack(f"{e}I", value)) for tag, kind, value in tags
    )
    path.write_bytes(header + data + ifd + struct.pack(f"{e}I", 0))


def _signed_ramp(dtype: str) -> np.ndarray:
    """-32768, -32768 + 257, ..., 32767: the 256 levels of the signed 16-bit range, row by row."""
    return (np.arange(SIDE * SIDE) * 257 - 32768).astype(dtype).reshape(SIDE, SIDE)


RED, GREEN, BLUE = [255, 0, 0], [0, 255, 0], [0, 0, 255]


class ModeCase(NamedTuple):
    name: str  # the file written
    opens_as: str  # the mode Pillow opens it in
    write: Callable[[Path], None]
    rgb_means: tuple[float, float, float]  # loaded with channels=3: the mean of each channel
    rgb_range: tuple[float, float]  # min and max over the channels
    gray: tuple[float, float, float]  # loaded with channels=1: mean, min, max
    tolerance: float  # 0 for lossless formats


# Grayscale of a colour is Pillow's ITU-R 601-2 luma: red 76, blue 29, (10, 200, 30) 124, (250, 0, 128) 89,
# (40, 20, 10) 25. Transparent pixels become black; 16-bit values are divided by 65535 / 255 = 257.
MODE_CASES = [
    ModeCase("1.png", "1", lambda p: _halves("1", 0, 1).save(p), (127.5, 127.5, 127.5), (0, 255), (127.5, 0, 255), 0),
    ModeCase("L.png", "L", lambda p: _ramp("L", 1, "u1").save(p), (127.5, 127.5, 127.5), (0, 255), (127.5, 0, 255), 0),
    ModeCase("L-trns.png", "L", lambda p: _halves("L", 200, 50).save(p, transparency=50), (100, 100, 100), (0, 200), (100, 0, 200), 0),
    ModeCase("P.png", "P", lambda p: _halves("P", 0, 1, RED + BLUE).save(p), (127.5, 0, 127.5), (0, 255), (52.5, 29, 76), 0),
    ModeCase("P-trns.png", "P", lambda p: _halves("P", 0, 1, RED + GREEN).save(p, transparency=1), (127.5, 0, 0), (0, 255), (38, 0, 76), 0),
    ModeCase("RGB.png", "RGB", lambda p: _halves("RGB", (10, 200, 30), (250, 0, 128)).save(p), (130, 100, 79), (0, 250), (106.5, 89, 124), 0),
    ModeCase(
        "RGB-trns.png", "RGB", lambda p: _halves("RGB", (10, 200, 30), (1, 2, 3)).save(p, transparency=(1, 2, 3)), (5, 100, 15), (0, 200), (62, 0, 124), 0
    ),
    ModeCase("RGBA.png", "RGBA", lambda p: _halves("RGBA", (10, 200, 30, 255), (200, 100, 50, 51)).save(p), (25, 110, 20), (10, 200), (74.5, 25, 124), 0),
    ModeCase("LA.png", "LA", lambda p: _halves("LA", (200, 255), (200, 0)).save(p), (100, 100, 100), (0, 200), (100, 0, 200), 0),
    ModeCase("I16-ramp.png", "I;16", lambda p: _ramp("I;16", 257, "<u2").save(p), (127.5, 127.5, 127.5), (0, 255), (127.5, 0, 255), 0),
    ModeCase("I16-halves.png", "I;16", lambda p: _halves("I;16", 1000, 64000).save(p), (126.5, 126.5, 126.5), (4, 249), (126.5, 4, 249), 0),
    ModeCase("I16-trns.png", "I;16", lambda p: _halves("I;16", 64000, 1000).save(p, transparency=1000), (124.5, 124.5, 124.5), (0, 249), (124.5, 0, 249), 0),
    ModeCase("I16B-ramp.tif", "I;16B", lambda p: _ramp("I;16B", 257, ">u2").save(p), (127.5, 127.5, 127.5), (0, 255), (127.5, 0, 255), 0),
    # Signed 16-bit (mode "I", stored as I;16S or I;16BS): -32768..32767 to 0..255, so 0 is mid-grey.
    ModeCase("I16S-ramp.tif", "I", lambda p: _integer_tiff(p, _signed_ramp("<i2"), signed=True), (127.5, 127.5, 127.5), (0, 255), (127.5, 0, 255), 0),
    ModeCase("I16BS-ramp.tif", "I", lambda p: _integer_tiff(p, _signed_ramp(">i2"), signed=True), (127.5, 127.5, 127.5), (0, 255), (127.5, 0, 255), 0),
    ModeCase(
        "I16S-halves.tif",
        "I",
        lambda p: _integer_tiff(p, np.repeat(np.array([-1000, 0], dtype="<i2"), SIDE // 2)[None].repeat(SIDE, axis=0), signed=True),
        (126, 126, 126),  # (-1000 + 32768) * 255 / 65535 = 123.6 -> 124; 0 -> 127.502 -> 128
        (124, 128),
        (126, 124, 128),
        0,
    ),
    # 12 bits per sample: 0..4095 to 0..255 (Pillow opens it in mode I;16, its values unscaled).
    ModeCase(
        "I12-ramp.tif",
        "I;16",
        lambda p: _integer_tiff(p, np.rint(np.arange(SIDE * SIDE) * 4095 / 255).astype("<u2").reshape(SIDE, SIDE), bits=12),
        (127.5, 127.5, 127.5),
        (0, 255),
        (127.5, 0, 255),
        0,
    ),
    # 12-bit data in 16-bit samples stays dark: a 16-bit sample means a fraction of 65535 (PNG, TIFF 6.0).
    ModeCase("I16-12bit.tif", "I;16", lambda p: _ramp("I;16", 16, "<u2").save(p), (7.9375, 7.9375, 7.9375), (0, 16), (7.9375, 0, 16), 0),
    ModeCase("CMYK.tif", "CMYK", lambda p: _halves("CMYK", (0, 255, 255, 0), (0, 0, 0, 255)).save(p), (127.5, 0, 0), (0, 255), (38, 0, 76), 0),
    ModeCase("CMYK.jpg", "CMYK", lambda p: _halves("CMYK", (0, 255, 255, 0), (0, 0, 0, 255)).save(p, quality=95), (127.5, 0, 0), (0, 255), (38, 0, 76), 4),
    ModeCase("YCbCr.tif", "YCbCr", lambda p: _halves("YCbCr", (0, 128, 128), (255, 128, 128)).save(p), (127.5, 127.5, 127.5), (0, 255), (127.5, 0, 255), 0),
    ModeCase("LAB.tif", "LAB", lambda p: _halves("LAB", (0, 128, 128), (255, 128, 128)).save(p), (127.5, 127.5, 127.5), (0, 255), (127.5, 0, 255), 1),
    ModeCase("PA.tif", "PA", lambda p: _halves("PA", (0, 255), (0, 0), RED + BLUE).save(p), (127.5, 0, 0), (0, 255), (38, 0, 76), 0),
    ModeCase("L.jpg", "L", lambda p: _halves("L", 40, 220).save(p, quality=95), (130, 130, 130), (40, 220), (130, 40, 220), 4),
    ModeCase(
        "RGB.jpg",
        "RGB",
        lambda p: _halves("RGB", (10, 200, 30), (250, 0, 128)).save(p, quality=95, subsampling=0),
        (130, 100, 79),
        (0, 250),
        (106.5, 89, 124),
        4,
    ),
    ModeCase(
        "RGBA.webp",
        "RGBA",
        lambda p: _halves("RGBA", (10, 200, 30, 255), (200, 100, 50, 51)).save(p, lossless=True, exact=True),
        (25, 110, 20),
        (10, 200),
        (74.5, 25, 124),
        0,
    ),
    ModeCase("RGB.webp", "RGB", lambda p: _halves("RGB", (10, 200, 30), (250, 0, 128)).save(p, lossless=True), (130, 100, 79), (0, 250), (106.5, 89, 124), 0),
    ModeCase("1.bmp", "1", lambda p: _halves("1", 0, 1).save(p), (127.5, 127.5, 127.5), (0, 255), (127.5, 0, 255), 0),
    ModeCase("P.bmp", "P", lambda p: _halves("P", 0, 1, RED + BLUE).save(p), (127.5, 0, 127.5), (0, 255), (52.5, 29, 76), 0),
    ModeCase("RGB.bmp", "RGB", lambda p: _halves("RGB", (10, 200, 30), (250, 0, 128)).save(p), (130, 100, 79), (0, 250), (106.5, 89, 124), 0),
    # An embedded ICC profile is applied: this file's red is sRGB's blue. One LittleCMS cannot read is ignored.
    ModeCase(
        "ICC-swapped.png",
        "RGB",
        lambda p: _halves("RGB", (255, 0, 0), (0, 0, 0)).save(p, icc_profile=_swapped_primaries_profile()),
        (0, 0, 127.5),
        (0, 255),
        (14.5, 0, 29),
        0,
    ),
    ModeCase(
        "ICC-broken.png", "RGB", lambda p: _halves("RGB", (255, 0, 0), (0, 0, 0)).save(p, icc_profile=b"not a profile"), (127.5, 0, 0), (0, 255), (38, 0, 76), 0
    ),
]
CASES = {case.name: case for case in MODE_CASES}


@pytest.fixture(scope="module")
def every_mode_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file per case of MODE_CASES, each checked to open in the mode the case names."""
    folder = tmp_path_factory.mktemp("modes")
    for case in MODE_CASES:
        case.write(folder / case.name)
        with Image.open(folder / case.name) as opened:
            assert opened.mode == case.opens_as, (case.name, opened.mode)
    return folder


def test_the_cases_cover_every_mode_pillow_writes_to_the_accepted_formats() -> None:
    writable = {"1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "I;16", "I;16B", "I"}  # I: signed 16-bit
    refused = {"F"}  # tested below, with 32-bit integer files (mode I too)
    never_in_a_file = {"HSV", "La", "RGBa", "RGBX", "I;16L", "I;16N"}  # Pillow opens no file in these modes
    assert {case.opens_as for case in MODE_CASES} == writable
    assert writable | refused | never_in_a_file == set(Image.MODES)
    assert {Path(case.name).suffix for case in MODE_CASES} == set(IMAGE_SUFFIXES) - {".jpeg", ".tiff"}


@pytest.mark.parametrize("name", list(CASES))
def test_every_mode_pillow_writes_is_converted_faithfully(every_mode_folder: Path, name: str) -> None:
    case = CASES[name]
    names = sorted(CASES)  # the loader's order: sorted paths

    rgb = load_image_folder(every_mode_folder, image_size=SIDE, channels=3).images[names.index(name)]
    gray_image = load_image_folder(every_mode_folder, image_size=SIDE, channels=1).images[names.index(name)]

    assert rgb.shape == (3, SIDE, SIDE) and gray_image.shape == (1, SIDE, SIDE)
    assert rgb.reshape(3, -1).mean(axis=1) == pytest.approx(case.rgb_means, abs=case.tolerance)
    assert (rgb.min(), rgb.max()) == pytest.approx(case.rgb_range, abs=case.tolerance)
    assert (gray_image.mean(), gray_image.min(), gray_image.max()) == pytest.approx(case.gray, abs=case.tolerance)


def test_sixteen_bit_grayscale_keeps_its_levels(every_mode_folder: Path) -> None:
    """A 16-bit ramp is the 8-bit ramp it scales to, all 256 levels, not a black-and-white mask."""
    images = load_image_folder(every_mode_folder, image_size=SIDE, channels=1).images
    names = sorted(CASES)

    eight_bit = images[names.index("L.png")]
    for name in ("I16-ramp.png", "I16B-ramp.tif", "I16S-ramp.tif", "I16BS-ramp.tif", "I12-ramp.tif"):
        np.testing.assert_array_equal(images[names.index(name)], eight_bit)
    assert len(np.unique(images[names.index("I16-ramp.png")])) == 256
    x = to_model_range(images[names.index("I16-ramp.png")][None])
    assert (x.min().item(), x.max().item()) == (-1.0, 1.0)


def test_sixteen_bit_is_resampled_before_it_is_rounded(tmp_path: Path) -> None:
    """Resized 16-bit images are averaged at 16 bits: 1-level steps survive as fractions, then round."""
    _ramp("I;16", 257, "<u2").save(tmp_path / "ramp.png")

    [image] = load_image_folder(tmp_path, image_size=8, channels=1).images

    assert 120 <= image.mean() <= 135 and image.min() < 20 and image.max() > 235


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """Orientation 6 ("rotate 90 degrees clockwise to view"): the stored left half is the viewed top half."""
    exif = Image.Exif()
    exif[0x0112] = 6
    _halves("L", 255, 0).save(tmp_path / "rotated.png", exif=exif)

    [image] = load_image_folder(tmp_path, image_size=SIDE, channels=1).images

    assert image[0, : SIDE // 2].min() == 255 and image[0, SIDE // 2 :].max() == 0


def _float_tiff(path: Path) -> None:
    Image.fromarray(np.linspace(0, 1, SIDE * SIDE, dtype=np.float32).reshape(SIDE, SIDE)).save(path)


def _int32_tiff(path: Path) -> None:
    Image.fromarray(np.arange(SIDE * SIDE, dtype=np.int32).reshape(SIDE, SIDE) * 100_000).save(path)


def test_float_and_32_bit_images_are_refused_naming_file_and_mode(tmp_path: Path) -> None:
    Image.new("L", (SIDE, SIDE), 90).save(tmp_path / "fine.png")
    _float_tiff(tmp_path / "depth.tif")
    _int32_tiff(tmp_path / "counts.TIFF")

    with pytest.raises(DatasetError) as info:
        load_image_folder(tmp_path, image_size=SIDE, channels=1)

    message = str(info.value)
    assert "2 of 3 images cannot be used" in message
    assert f"{str(tmp_path / 'depth.tif')!r} has mode 'F' (32-bit floating-point samples)" in message
    assert f"{str(tmp_path / 'counts.TIFF')!r} has mode 'I' (32-bit signed integer samples)" in message
    assert "convert it to 8- or 16-bit" in message and "fine.png" not in message


def test_many_bad_files_are_counted_after_the_first_ten(tmp_path: Path) -> None:
    for i in range(12):
        (tmp_path / f"broken-{i:02d}.jpg").write_bytes(b"not a jpeg")

    with pytest.raises(DatasetError, match=r"12 of 12 images cannot be used") as info:
        load_image_folder(tmp_path, image_size=SIDE, channels=3)

    assert "broken-09.jpg" in str(info.value) and "broken-10.jpg" not in str(info.value)
    assert str(info.value).endswith("... and 2 more")


def test_suffixes_name_formats_pillow_reads() -> None:
    for suffix in IMAGE_SUFFIXES:
        assert suffix in Image.registered_extensions(), suffix


def test_worker_refuses_a_float_image_at_start(tmp_path: Path) -> None:
    """Before it dials the coordinator (none listens here): exit 2 with the file and its mode."""
    data = tmp_path / "images"
    data.mkdir()
    _float_tiff(data / "scan.tif")

    result = subprocess.run(
        [sys.executable, "-m", "feddiff", "worker", "--coordinator", "127.0.0.1:9", "--insecure", "--data-dir", str(data),
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert result.returncode == 2, result.stderr
    assert f"{str(data / 'scan.tif')!r} has mode 'F'" in result.stderr


# --- Pixel ranges --------------------------------------------------------------------------------------


def test_model_range_roundtrip() -> None:
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)

    x = to_model_range(pixels)

    assert x.dtype == torch.float32 and x.shape == (1, 1, 16, 16)
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.equal(from_model_range(x), torch.from_numpy(pixels))
    assert torch.equal(to_model_range(torch.from_numpy(pixels)), x)


def test_from_model_range_clamps_and_rounds() -> None:
    x = torch.tensor([-3.0, -1.0, 0.0, 0.999, 1.0, 7.0])

    assert from_model_range(x).tolist() == [0, 0, 128, 255, 255, 255]


def test_to_model_range_rejects_float() -> None:
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(np.zeros((1, 1, 2, 2), dtype=np.float32))


def test_an_image_folder_too_large_for_memory_at_its_image_size_is_refused_before_loading(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 128).save(tmp_path / "a.png")

    with pytest.raises(DatasetError, match=r"1 images at image_size 10000000 \(1 channel\(s\)\) need .* GiB to load and .* GiB is available"):
        load_image_folder(tmp_path, image_size=10_000_000, channels=1)
