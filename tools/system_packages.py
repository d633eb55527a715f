"""The Debian packages the test suite needs beside Python's: `make test` installs the missing ones when it
runs as root (CI does), as it does Fashion-MNIST, and otherwise says what to install; the suites that need
one skip with the package and the command in their reason, never silently."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence

# command -> (Debian package, the tests that run it)
COMMANDS: dict[str, tuple[str, str]] = {
    "promtool": ("prometheus", "the Prometheus rule tests (pytest -m prometheus, tests/deploy)"),
    "prometheus": ("prometheus", "the live Prometheus test (pytest -m prometheus)"),
    "ip": ("iproute2", "the network suite (pytest -m network)"),
    "tc": ("iproute2", "the network suite (pytest -m network)"),
}


def install_command(packages: Sequence[str]) -> str:
    return f"apt-get install -y {' '.join(packages)}"


def skip_reason(command: str) -> str:
    """Why a test that runs `command` skips where it is missing: the package and how to install it."""
    package, _ = COMMANDS[command]
    return f"{command} is not installed: it comes with Debian's {package} package (sudo {install_command([package])}; make test installs it as root)"


def installed(command: str) -> str | None:
    """Where `command` is: on PATH, or in the sbin folders a user's PATH often lacks (ip, tc)."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
    return shutil.which(command, path=path)


def missing(which: Callable[[str], str | None] = installed) -> list[str]:
    """The packages of the commands not on PATH, each once, in the order of COMMANDS."""
    packages = [package for command, (package, _) in COMMANDS.items() if which(command) is None]
    return list(dict.fromkeys(packages))


def main(
    which: Callable[[str], str | None] = installed,
    is_root: bool | None = None,
    run: Callable[[list[str]], int] = lambda cmd: subprocess.run(cmd, check=False).returncode,
) -> int:
    """Install what is missing (as root, with apt-get), or name it. Non-zero only when an install failed."""
    packages = missing(which)
    if not packages:
        return 0
    root = os.geteuid() == 0 if is_root is None else is_root
    if root and which("apt-get") is not None:
        install = ["apt-get", "install", "-y", "-q", *packages]
        if run(install) == 0:
            return 0
        if run(["apt-get", "update", "-q"]) != 0:  # a fresh machine's package lists may be empty or stale
            return 1
        return 0 if run(install) == 0 else 1
    suites = sorted({suite for command, (package, suite) in COMMANDS.items() if package in packages})
    print(f"not installed: Debian's {', '.join(packages)}; these will be skipped: {'; '.join(suites)}.", file=sys.stderr)
    print(f"Install with: sudo {install_command(packages)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
