"""Crash-safe files: whole-file writes (a temporary file in the same folder, fsync, rename, fsync of the
folder), and JSON-lines files appended to line by line and read back after a crash may have cut one short."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, TypeVar

Record = TypeVar("Record")
MALFORMED = (AttributeError, KeyError, TypeError, ValueError)  # what reading a JSON object of the wrong shape raises


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


@contextlib.contextmanager
def naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """An OSError raised in the block names `path` when it names no file (a write's ENOSPC or EIO names none)."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = os.fspath(path)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: object) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def file_in_the_way(path: str | os.PathLike[str]) -> Path | None:
    """`path` or the nearest of its parents that exists, when that is not a folder (a file, a socket); None
    when it is a folder (the folder itself, or one it can be made in)."""
    path = Path(path)
    for at in (path, *path.parents):
        if at.exists():
            return None if at.is_dir() else at
    return None


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


class JsonLine(NamedTuple):
    """One complete line of a JSON-lines file."""

    number: int  # 1-based line number in the file
    text: str  # the line as written, without its newline
    value: dict[str, Any]  # the JSON object it holds


def read_json_lines(path: str | os.PathLike[str]) -> list[JsonLine]:
    """Every line of a JSON-lines file that holds a JSON object ([] when there is no file); a line cut short by
    a crash, or blank, is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    found = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            found.append(JsonLine(number, text, value))
    return found


def read_records(path: str | os.PathLike[str], parse: Callable[[dict[str, Any]], Record], what: str) -> list[tuple[str, Record]]:
    """Each complete line of a JSON-lines file (`read_json_lines`) and what `parse` makes of its object;
    ValueError naming the file, the line and `what` it is not, where `parse` raises one of MALFORMED."""
    found = []
    for line in read_json_lines(path):
        try:
            found.append((line.text, parse(line.value)))
        except MALFORMED as e:
            raise ValueError(f"{os.fspath(path)}, line {line.number}: not {what} ({type(e).__name__}: {e})") from None
    return found


def append_json_line(path: str | os.PathLike[str], obj: object) -> None:
    """Append `obj` as one JSON line, on disk (fsync) when this returns; a last line that a crash cut short is
    ended first, so that the new line stays whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


LOCK_FILE = "lock"


class FolderInUse(Exception):
    """Another process holds a folder's lock (`lock_folder`); `holder` is its pid as it wrote it."""

    def __init__(self, folder: Path, holder: str):
        super().__init__(f"{folder} is in use by another process (pid {holder})")
        self.folder, self.holder = folder, holder


def lock_folder(folder: str | os.PathLike[str]) -> int:
    """An exclusive lock (flock) on FOLDER/lock for this process, with its pid written in it; the open file
    descriptor, whose closing (or the process's end, however it ends) releases it. FolderInUse when another
    process holds it; OSError when the file cannot be opened."""
    folder = Path(folder)
    # Held open read-only: a file open for writing would keep the folder's filesystem from being remounted
    # read-only (EBUSY), which an operator may do to a run's disk; flock does not need write access.
    fd = os.open(folder / LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FolderInUse(folder, holder) from None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):  # a full or read-only disk: the pid is only there to name the holder
        (folder / LOCK_FILE).write_text(f"{os.getpid()}\n")
    return fd
