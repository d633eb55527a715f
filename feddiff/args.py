"""What feddiff's commands share on the command line: a command as its flags and what runs it, the speed flags
of the commands that train, and the words of the flags that more than one command takes. Light to import:
what a command needs (torch above all, which `feddiff status` never imports) is imported when it runs."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Command:
    """A subcommand: the flags it takes and what runs it, given the parsed flags (its exit status)."""

    add_flags: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# What the flags of a run's shape mean (simulate, reproduce); their types, ranges and defaults come from the
# fields of the command's config.
RUN_MEANING = {
    "strategy": "which UNet parts the clients exchange",
    "model": "model preset",
    "rounds": "R, federated rounds",
    "clients_per_round": "0 = every client, else a seeded sample",
    "epochs": "local epochs per round",
    "batch_size": "images per training step",
    "lr": "Adam's step size",
    "loss": "training loss",
    "seed": "model init, plans, training and sampling noise",
    "compression": "how clients code their deltas, with error feedback (none, bf16, int8, int4, topk:0.05+int8, ...)",
    "compression_block": "int8 / int4 elements per scale (0 = the codec name's: 64 unless it says)",
    "inception_weights": "pytorch-fid Inception weights: FD on its features (never downloaded)",
}

# The words of a path flag: --out-dir names a folder a command writes (simulate, reproduce, certs), --out a file
# (sample's PNG, export's model); --checkpoint what a model is read from (a checkpoint folder or a file), and
# --checkpoint-dir only the coordinator's run folder. The number of images a command generates is --samples
# (sample, evaluate, reproduce; the coordinator's --eval-samples). Their old spellings still work, with a notice.
OUT_DIR_OLD_SPELLINGS = {"out_dir": ("--out",)}

DEVICES_MEANING = "train each round's clients in parallel, one process per device (--threads per process; default: torch's threads shared out)"

SPEED_MEANING = {  # what each speed flag means; its type, range and default come from SpeedConfig's fields
    "device": "where to train",
    "bf16": "bf16 autocast (auto: on GPUs and CPUs that run bf16 natively)",
    "channels_last": "NHWC memory format",
    "fused_adam": "fused Adam kernel",
    "compile": "torch.compile with CUDA graphs (auto: on CUDA)",
    "threads": "CPU threads for torch (0 = torch's default)",
}


def add_speed_flags(p: argparse.ArgumentParser) -> None:
    """The speed flags, each with the type, range or choices its SpeedConfig field declares, and --no-compile,
    the old spelling of --compile off (with a notice, not in the help); a command's config that holds a
    SpeedConfig takes them (`service.flags.build`)."""
    from fedcore.model.training import SpeedConfig
    from service import flags

    flags.add_flags(p, SpeedConfig, SPEED_MEANING)
    flags.add_old_switch(p, "--no-compile", "compile", "off", "--compile off")


def check_file_path(path: Path, flag: str) -> None:
    """ValueError naming `flag` when no file can be made at `path`: a file is in place of one of its folders."""
    from fedcore.atomic import file_in_the_way

    in_the_way = file_in_the_way(path.parent)
    if in_the_way is not None:
        raise ValueError(f"{flag} {str(path)!r}: {str(in_the_way)!r} is a file, not a folder")


def check_folder_path(folder: Path, flag: str) -> None:
    """ValueError naming `flag` when `folder` cannot be a folder: a file is there, or in place of a parent."""
    from fedcore.atomic import file_in_the_way

    in_the_way = file_in_the_way(folder)
    if in_the_way == folder:
        raise ValueError(f"{flag} {str(folder)!r} is a file, not a folder")
    if in_the_way is not None:
        raise ValueError(f"{flag} {str(folder)!r} cannot be a folder (its parent {str(in_the_way)!r} is a file)")
