"""The types of the settings only a process's edge takes: the address it listens on or dials, a host name a
certificate names or is checked against, and the ready file it writes for scripts. Each is checked at start, so
that a typo stops the process before it joins a run (or a certificate is issued for a name no one can dial)."""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from fedcore.settings import Described, ExistingFile


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


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
MAX_HOST_NAME = 253  # characters of a DNS name (RFC 1035), its dots included
MAX_LABEL = 63  # characters of one of its labels


def _host_name(text: str) -> str:
    """`text` when it is an IP address or a DNS name (RFC 1123 labels of letters, digits and inner hyphens,
    dot-separated, the first one `*` in a wildcard name); ValueError saying what is wrong otherwise."""
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    if not text.strip():
        raise ValueError("an empty name")
    if any(c.isspace() for c in text):
        raise ValueError("a name with a space in it")
    if len(text) > MAX_HOST_NAME:
        raise ValueError(f"{len(text)} characters: a DNS name has at most {MAX_HOST_NAME}")
    labels = text.removesuffix(".").split(".")
    long = next((label for label in labels if len(label) > MAX_LABEL), None)
    if long is not None:
        raise ValueError(f"label {long[:20]!r}... has {len(long)} characters: a DNS label has at most {MAX_LABEL}")
    bad = next((label for i, label in enumerate(labels) if not (_LABEL.fullmatch(label) or (i == 0 and label == "*" and len(labels) > 2))), None)
    if bad is not None:
        raise ValueError(f"label {bad!r} is not letters, digits and inner hyphens")
    return text


def _server_name(text: str) -> str:
    return _host_name(text) if text else text  # empty: not given


HOST_NAME_WORDS = "a DNS name (letters, digits, hyphens and dots) or an IP address"
HostName = Annotated[str, AfterValidator(_host_name), Described(HOST_NAME_WORDS)]
ServerName = Annotated[str, AfterValidator(_server_name), Described(HOST_NAME_WORDS)]  # "" = not given


def _token_file(text: str) -> str:
    """`text` when empty (not used), or a readable file that holds a token (its text, stripped, is not empty):
    read at start, so that a wrong file stops the process rather than sending an empty bearer token."""
    if not text:
        return text
    try:
        token = Path(text).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:  # readable a moment ago (ExistingFile)
        raise ValueError(f"cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not token:
        raise ValueError("the file is empty or holds only blanks")
    return text


# A file holding a bearer token (empty = not used), read and checked at start
TokenFile = Annotated[ExistingFile, AfterValidator(_token_file)]

# A file the process writes once it serves, for scripts and tests: {"address", "metrics_port", ...}
ReadyFile = Annotated[str, AfterValidator(_ready_file), Described("a new file in an existing folder, or an earlier ready file")]
