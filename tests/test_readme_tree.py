"""The README's architecture tree names every module of the packages at its path, and names none that does not exist.

The tree is read as it is drawn: an entry (`fedcore/`, `  data/`, `  errors.py`) starts a line, two spaces of
indentation per folder level; the modules a folder's description lists (`datasets.py (...), splits.py`) are in
that folder, those a module's description lists (`atomic.py ...; settings.py: ...`) beside it; a line indented
to the description column goes on describing the entry above it.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedcore", "service", "coordinator", "worker", "feddiff")
INDENT = 2  # spaces per folder level in the tree
ENTRY = re.compile(r"^( *)(\S+)(\s+|$)")
MODULE = re.compile(r"(?<![\w/.])(\w+\.py)\b")  # a module's file name, not the end of a path or a dotted name


def _tree() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1]
    return section.split("```", 2)[1]


def tree_paths(tree: str) -> set[str]:
    """Every module path the tree names, each from the folders its line is indented under."""
    paths: set[str] = set()
    folders: list[str] = []  # the folders enclosing the current entry, outermost first
    here = ""  # the folder of the current entry's description
    description_column = 0
    for line in tree.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        if description_column and indent >= description_column:  # the entry above, described further
            text = line
        else:
            match = ENTRY.match(line)
            assert match, f"README tree line not understood: {line!r}"
            assert indent % INDENT == 0, f"README tree entry indented by {indent} spaces, not a multiple of {INDENT}: {line!r}"
            depth, name = indent // INDENT, match.group(2)
            assert depth <= len(folders), f"README tree entry {name!r} indented deeper than the folder above it: {line!r}"
            del folders[depth:]
            if name.endswith("/"):
                folders.append(name.rstrip("/"))
                here = "/".join(folders)
            else:
                assert name.endswith(".py"), f"README tree entry {name!r} is neither a folder (name/) nor a module (name.py)"
                here = "/".join(folders)
                paths.add(f"{here}/{name}" if here else name)
            description_column = match.end() if match.group(3) else 0
            text = line[match.end() :]
        paths.update(f"{here}/{name}" if here else name for name in MODULE.findall(text))
    return paths


def package_paths() -> set[str]:
    """Every module of the packages, relative to the repository: generated code and package markers left out."""
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            relative = path.relative_to(ROOT)
            if path.name not in ("__init__.py", "__main__.py") and "proto" not in relative.parts:
                found.add(relative.as_posix())
    return found


def test_tree_paths_follow_the_indentation() -> None:
    tree = """
top/                 a package: one.py, two.py (with a note.py)
  inner/             three.py,
                     four.py (described further)
  five.py            a module; six.py: beside it, and not fedcore/seven.py nor fedcore.eight.py
other/
  deeper/
    nine.py
  ten.py
"""

    assert tree_paths(tree) == {
        "top/one.py",
        "top/two.py",
        "top/note.py",
        "top/inner/three.py",
        "top/inner/four.py",
        "top/five.py",
        "top/six.py",
        "other/deeper/nine.py",
        "other/ten.py",
    }


def test_every_module_is_in_the_readme_tree_at_its_path() -> None:
    missing = sorted(package_paths() - tree_paths(_tree()))

    assert not missing, f"modules the README's architecture tree does not name at their path: {missing}"


def test_every_module_the_readme_tree_names_exists_at_its_path() -> None:
    unknown = sorted(tree_paths(_tree()) - package_paths())

    assert not unknown, f"the README's architecture tree names modules that are not at that path: {unknown}"
