"""Tests for fedcore.data: the IDX reader on the real Fashion-MNIST files, image folders, pixel ranges."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedcore.data import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_DIR_ENV,
    DatasetError,
    ImageDataset,
    fashion_mnist_dir,
    from_model_range,
    load_fashion_mnist,
    load_image_folder,
    read_idx,
    to_model_range,
)

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
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
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

    with pytest.raises(DatasetError, match="truncated-idx3.gz"):
        read_idx(path)


# --- Fashion-MNIST location ----------------------------------------------------------------------------


def test_missing_directory_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset-fashion-mnist") as info:
        load_fashion_mnist(root=tmp_path / "nowhere")
    assert FASHION_MNIST_DIR_ENV in str(info.value)


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
    with pytest.raises(DatasetError, match="no PNG or JPEG"):
        load_image_folder(tmp_path, image_size=28, channels=1)
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere", image_size=28, channels=1)
    with pytest.raises(ValueError, match="channels is 2"):
        load_image_folder(tmp_path, image_size=28, channels=2)


def test_load_image_folder_unreadable_image(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")

    with pytest.raises(DatasetError, match="broken.png"):
        load_image_folder(tmp_path, image_size=28, channels=1)


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
