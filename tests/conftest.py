"""Shared fixtures: one CPU thread, one cache of reference statistics, seeding, and the part layouts of the tiny and paper models."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from fedcore.data.datasets import DEFAULT_FASHION_MNIST_DIR
from fedcore.evaluation.fid import CACHE_DIR_ENV
from fedcore.model.parts import Part, PartLayout
from fedcore.model.unet import build_model, layout_of


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread() -> None:
    """The suite shares two cores with other jobs: one intra-op thread keeps timings stable."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One cache of reference statistics for the session's processes (the coordinators and workers tests start
    inherit it), never the user's: each set of real images is featurized once per session, not per process."""
    before = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("feddiff-cache"))
    yield
    if before is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = before


@pytest.fixture
def seed_everything() -> Callable[[int], None]:
    """Seed Python, numpy and torch's global generators (tests that use explicit generators need not)."""

    def seed(value: int = 0) -> None:
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)

    return seed


@pytest.fixture(scope="session")
def tiny_layout() -> PartLayout:
    """The part schema of the `tiny` preset (143,951 parameters, same topology as the paper's UNet)."""
    return layout_of(build_model("tiny", seed=0))


@pytest.fixture(scope="session")
def paper_sizes() -> dict[Part, int]:
    """Parameters per part of the paper's Fashion-MNIST UNet."""
    return layout_of(build_model("paper-fmnist", seed=0)).sizes


@pytest.fixture(scope="session")
def fashion_mnist_dir():
    """The installed Fashion-MNIST directory, or a skip when the Debian package is absent."""
    if not (DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return DEFAULT_FASHION_MNIST_DIR
