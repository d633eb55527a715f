"""The `feddiff` command: one entry point, a subcommand per job; configs are built at this edge, in each
command's module, which is imported only when its command runs (or shows its help): `feddiff --help` and
`feddiff status` start without torch."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from feddiff.args import Command

# Each command: what it does (`feddiff --help`) and the module whose COMMANDS[name] adds its flags and runs it.
COMMANDS: dict[str, tuple[str, str]] = {
    "model-info": ("parameter counts of a model preset, by part", "feddiff.inspect_cli"),
    "strategies": ("parameters each strategy exchanges, counted the paper's way", "feddiff.inspect_cli"),
    "split": ("each client's size and class histogram under a data split", "feddiff.inspect_cli"),
    "simulate": ("a whole federated run in one process (experiments on one GPU)", "feddiff.simulate_cli"),
    "reproduce": ("the paper's experiment table in simulation, one cell at a time, resumable; renders docs/results.md", "feddiff.reproduce_cli"),
    "coordinator": ("run the coordinator (gRPC server, round loop, checkpoints, metrics)", "feddiff.system_cli"),
    "worker": ("run a worker daemon that trains on this host's private images", "feddiff.system_cli"),
    "certs": ("create a project CA, the coordinator's certificate and one per worker (mutual TLS)", "feddiff.system_cli"),
    "health": ("exit 0 when the coordinator's gRPC health service says SERVING", "feddiff.system_cli"),
    "status": ("round, workers, bytes and reduction of a coordinator", "feddiff.system_cli"),
    "export": ("the global or a personalised model as safetensors + a JSON config, or as a diffusers pipeline", "feddiff.models_cli"),
    "sample": ("a PNG grid of samples from a checkpoint or an exported model", "feddiff.models_cli"),
    "evaluate": ("the Frechet distance of a model's samples to real images (how good is it?)", "feddiff.models_cli"),
}


def command(name: str) -> Command:
    """The command `name`, its module imported."""
    command: Command = importlib.import_module(COMMANDS[name][1]).COMMANDS[name]
    return command


class Subcommands(argparse._SubParsersAction):
    """feddiff's subcommands; a command's flags are added to its parser when the command is chosen."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._with_flags: set[str] = set()

    def parser(self, name: str) -> argparse.ArgumentParser:
        """The parser of command `name`, with its flags."""
        parser: argparse.ArgumentParser = self._name_parser_map[name]
        if name not in self._with_flags:
            command(name).add_flags(parser)
            from service.flags import HelpFormatter  # what every command's module imports: no old spelling in its help

            parser.formatter_class = HelpFormatter
            self._with_flags.add(name)
        return parser

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        chosen = self.parser(values[0]) if values and values[0] in self._name_parser_map else None
        super().__call__(parser, namespace, values, option_string)
        unknown = getattr(namespace, argparse._UNRECOGNIZED_ARGS_ATTR, None)
        if chosen is not None and unknown:  # said with the command's usage, not feddiff's
            chosen.error(f"unrecognized arguments: {' '.join(unknown)}")


# What a command that saves its progress says when Ctrl-C stops it: how to go on.
ON_INTERRUPT = {
    "simulate": "; its finished rounds are checkpointed: the same command with --resume goes on from the last one",
    "reproduce": "; its finished rounds and cells are saved: the same command goes on from the last one",
}


def build_parser() -> argparse.ArgumentParser:
    """feddiff's parser: every command by name, each command's flags added when it is chosen."""
    # No abbreviations: a prefix of one flag must never become another (--clients as --clients-per-round).
    parser = argparse.ArgumentParser(prog="feddiff", description="Federated training of diffusion models.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", action=Subcommands)
    for name, (text, _) in COMMANDS.items():
        sub.add_parser(name, help=text, description=text, allow_abbrev=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command's exit status: 2 for a refused setting or input file (missing, in the way, or not what it
    should be), 1 when a port to listen on is taken (or the coordinator's run failed), one line on stderr
    saying why."""
    from fedcore.errors import CannotListen, FeddiffError

    args = build_parser().parse_args(argv)
    try:
        return command(args.command).run(args)
    except KeyboardInterrupt:
        print(f"feddiff {args.command}: interrupted{ON_INTERRUPT.get(args.command, '')}", file=sys.stderr)
        return 130
    except CannotListen as e:
        print(f"feddiff {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FeddiffError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        print(f"feddiff {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
