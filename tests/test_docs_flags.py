"""Every flag a command line of the README or docs/ gives `feddiff COMMAND` is one that command's parser
takes, spelled as it is today (an old spelling still works, with a notice, but the docs teach the new one): a
renamed flag cannot linger in the docs.

A command line is read as a shell reads it: `feddiff COMMAND` (or `python -m feddiff COMMAND`) and what follows
on its line, lines joined at a trailing backslash, up to a comment, a pipe, `&&`, `;` or the end of an inline
code span."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from feddiff.cli import COMMANDS, build_parser
from tests.parsers import subcommands

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
COMMAND = re.compile(r"\bfeddiff +(" + "|".join(re.escape(name) for name in COMMANDS) + r")\b([^`\n]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def command_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, command, the rest of its command line) of every `feddiff COMMAND` in `text`."""
    found = []
    joined = re.sub(r"\\\n", lambda m: "  \x00", text)  # a continued line: one line, its line breaks counted below
    for match in COMMAND.finditer(joined):
        rest = re.split(r" #|\||&&|;", match.group(2), maxsplit=1)[0]
        line = joined.count("\n", 0, match.start()) + joined.count("\x00", 0, match.start()) + 1
        found.append((line, match.group(1), rest))
    return found


def test_command_lines_are_read_as_a_shell_reads_them() -> None:
    text = "run `feddiff simulate --rounds 2` then --not-this\nfeddiff worker --a \\\n  --b # --c\n`feddiff status --json | jq .` `feddiff nope --x`"

    assert command_lines(text) == [(1, "simulate", " --rounds 2"), (2, "worker", " --a   \x00  --b"), (4, "status", " --json ")]


def _unknown_flags() -> list[str]:
    parsers = subcommands(build_parser())
    takes = {name: {s for action in parser._actions for s in action.option_strings if s not in getattr(action, "old", ())} for name, parser in parsers.items()}
    return [
        f"{path.relative_to(ROOT)}:{line}: feddiff {command} {flag}"
        for path in DOCS
        for line, command, rest in command_lines(path.read_text())
        for flag in FLAG.findall(rest)
        if flag not in takes[command]
    ]


@pytest.mark.parametrize("doc", [path.relative_to(ROOT).as_posix() for path in DOCS])
def test_the_docs_are_read(doc: str) -> None:
    assert (ROOT / doc).is_file()


def test_every_flag_the_docs_give_a_command_is_one_it_takes() -> None:
    assert _unknown_flags() == []
