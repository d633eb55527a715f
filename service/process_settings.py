"""The types of the settings only a process's edge takes: the address it listens on or dials, and the ready
file it writes for scripts. Each is checked at start, so that a typo stops the process before it joins a run."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from fedcore.settings import Described


def _address(text: str, *, least_port: int) -> str:
    host, colon, port = text.rpartition(":")
    if not (colon and host.strip("[]") and not any(c.isspace() for c in host) and port.isdigit() and least_port <= int(port) <= 65535):
        raise ValueError()  # the type's words say what it takes
    return text


ListenAddress = Annotated[str, AfterValidator(functools.partial(_address, least_port=0)), Described("HOST:PORT with a port in 0..65535 (0: a free one)")]
ConnectAddress = Annotated[str, AfterValidator(functools.partial(_address, least_port=1)), Described("HOST:PORT with a port in 1..65535")]


def _ready_file(text: str) -> str:
    """`text` when empty (not used), or a path whose folder exists and which is new or a ready file written
    before (a JSON object): a typo must not overwrite a file of another kind (run as root: any file)."""
    if not text:
        return text
    path = Path(text)
    if not path.parent.is_dir():
        raise ValueError(f"no folder {str(path.parent)!r}")
    if path.is_dir():
        raise ValueError("a folder")
    if path.exists():
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            earlier = None
        if not isinstance(earlier, dict):
            raise ValueError("an existing file that is not a ready file; give a new path")
    return text


# A file the process writes once it serves, for scripts and tests: {"address", "metrics_port", ...}
ReadyFile = Annotated[str, AfterValidator(_ready_file), Described("a new file in an existing folder, or an earlier ready file")]
