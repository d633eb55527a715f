"""Crash-safe file writes: a temporary file in the same folder, fsync, rename, fsync of the folder."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike[str], data: bytes | Callable[[BinaryIO], None]) -> None:
    """After this returns the file holds `data` (bytes, or what a writer function writes to the open file);
    if it raises, the previous file (if any) is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: str | os.PathLike[str], obj: object) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def writable_folder(path: str | os.PathLike[str]) -> Path:
    """`path`, created if missing, once a file has been created in it and removed again; OSError when either
    fails (a file in the way, a read-only or foreign folder). A full disk passes: an empty file needs no
    space, and a failed save later leaves the files before it as they were."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".probe.tmp-{os.getpid()}"  # named as atomic_write's temporary files: cleaned up as they are
    probe.touch()
    probe.unlink()
    return path
