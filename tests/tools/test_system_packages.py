"""`make test` installs the Debian packages the suite needs when it runs as root, names them otherwise, and
the suites that need one skip with the package and the command in their reason."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tools.system_packages import COMMANDS, main, missing, skip_reason

ROOT = Path(__file__).resolve().parents[2]


def _which(present: set[str]):
    return lambda command: f"/usr/bin/{command}" if command in present else None


def test_the_packages_of_missing_commands_are_named_once() -> None:
    assert missing(_which({"promtool", "prometheus", "ip", "tc"})) == []
    assert missing(_which({"ip", "tc"})) == ["prometheus"]
    assert missing(_which(set())) == ["prometheus", "iproute2"]


def test_as_root_the_missing_packages_are_installed_updating_the_lists_once_when_needed() -> None:
    calls: list[list[str]] = []
    results = iter([100, 0, 0])  # the first install finds no package lists: update, then install again

    def run(cmd: list[str]) -> int:
        calls.append(cmd)
        return next(results)

    assert main(which=_which({"apt-get", "ip", "tc"}), is_root=True, run=run) == 0
    assert calls == [["apt-get", "install", "-y", "-q", "prometheus"], ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "prometheus"]]


def test_a_failed_install_fails_make_test() -> None:
    assert main(which=_which({"apt-get"}), is_root=True, run=lambda cmd: 100) == 1


def test_without_root_nothing_is_installed_and_the_command_is_named(capsys) -> None:
    def run(cmd: list[str]) -> int:
        raise AssertionError(f"ran {cmd}")

    assert main(which=_which({"apt-get"}), is_root=False, run=run) == 0

    err = capsys.readouterr().err
    assert "Install with: sudo apt-get install -y prometheus iproute2" in err
    assert "pytest -m network" in err and "pytest -m prometheus" in err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_skip_names_the_package_and_the_command(command: str) -> None:
    package = COMMANDS[command][0]
    assert f"Debian's {package} package (sudo apt-get install -y {package};" in skip_reason(command)


def test_make_test_runs_it_before_the_suite() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: .*\bsystem-packages\b", makefile, re.M)
    assert re.search(r"^system-packages:\n\t@?\$\(PYTHON\) -m tools\.system_packages$", makefile, re.M)
