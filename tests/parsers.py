"""The subcommands of feddiff's command-line parser, for the tests of flags and help."""

from __future__ import annotations

import argparse

from feddiff.cli import Subcommands


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's own parser with its flags, by name (`feddiff worker ...`: "worker")."""
    (sub,) = [a for a in parser._actions if isinstance(a, Subcommands)]
    return {name: sub.parser(name) for name in sub.choices}
