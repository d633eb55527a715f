"""The subcommands of feddiff's command-line parser, and the coordinator's config as its flags build it, for the
tests of flags and help."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from feddiff.cli import Subcommands

if TYPE_CHECKING:
    from coordinator.config import CoordinatorConfig


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's own parser with its flags, by name (`feddiff worker ...`: "worker")."""
    (sub,) = [a for a in parser._actions if isinstance(a, Subcommands)]
    return {name: sub.parser(name) for name in sub.choices}


def coordinator_config(config_file: str | Path | None, given: Mapping[str, object]) -> CoordinatorConfig:
    """The coordinator's config as `feddiff coordinator` builds it: the settings file `config_file` (--config;
    None: none) under the flags `given`, by setting (`{"min_workers": "2"}`: --min-workers 2; None: not given)."""
    from coordinator.config import from_args

    return from_args(argparse.Namespace(config=config_file, **given))
