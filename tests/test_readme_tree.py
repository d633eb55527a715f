"""The README's architecture tree names every module of the packages, and names none that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedcore", "service", "coordinator", "worker", "feddiff")


def _tree() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1]
    return section.split("```", 2)[1]


def _modules() -> dict[str, list[Path]]:
    """Each module's file name -> its paths, generated code and package markers left out."""
    found: dict[str, list[Path]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.name not in ("__init__.py", "__main__.py") and "proto" not in path.relative_to(ROOT).parts:
                found.setdefault(path.name, []).append(path.relative_to(ROOT))
    return found


def test_every_module_is_in_the_readme_tree() -> None:
    named = set(re.findall(r"\b(\w+\.py)\b", _tree()))

    missing = sorted(str(p) for name, paths in _modules().items() if name not in named for p in paths)

    assert not missing, f"modules the README's architecture tree does not name: {missing}"


def test_every_module_the_readme_tree_names_exists() -> None:
    named = set(re.findall(r"\b(\w+\.py)\b", _tree()))

    unknown = sorted(named - set(_modules()))

    assert not unknown, f"the README's architecture tree names modules that do not exist: {unknown}"
