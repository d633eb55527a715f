"""A small real filesystem for tests of full and read-only disks: a tmpfs mounted by the test (root only)."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def mount_tmpfs(path: Path, size: str, *options: str) -> None:
    """A tmpfs of `size` (e.g. "2m") at `path`; a skip naming what is missing when the test is not root or
    the mount fails. `unmount` it in a `finally`."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem (tmpfs) needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def unmount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextmanager
def mounted_tmpfs(path: Path, size: str, *options: str) -> Iterator[Path]:
    """`mount_tmpfs`, unmounted at the end of the block."""
    mount_tmpfs(path, size, *options)
    try:
        yield path
    finally:
        unmount(path)


def fill(path: Path) -> Path:
    """Write zeros until the filesystem is full (ENOSPC); the file that holds them."""
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f:
        block = bytes(16 << 10)
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


def remount(path: Path, mode: str, timeout: float = 10.0) -> None:
    """Remount `path` "ro" or "rw" (retried while a file is still open for writing)."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], capture_output=True, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no remount {mode} of {path} after {timeout}s")
        time.sleep(0.05)
