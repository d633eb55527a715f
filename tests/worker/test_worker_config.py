"""The worker's settings from flags (its speed settings included): every value converted to its setting's
type or refused at start in one line that names the flag, the value and what was expected."""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any, Literal, get_origin, get_type_hints

import pytest
import torch

from fedcore import settings
from fedcore.data.shards import SplitConfig
from fedcore.model.training import SpeedConfig
from fedcore.settings import Folder
from feddiff.cli import build_parser, main
from service import flags
from tests.parsers import subcommands
from worker.config import WorkerConfig, from_args

BASE = ["worker", "--coordinator", "coord.example.org:50051", "--client-index", "0"]


def _flags() -> list[tuple[str, Any]]:
    """(flag, type) of every worker and speed setting that a flag sets from a string."""
    parser = build_parser()
    worker = subcommands(parser)["worker"]
    options = {o for action in worker._actions for o in action.option_strings}
    out = []
    for cls in (WorkerConfig, SplitConfig, SpeedConfig):
        for name, tp in get_type_hints(cls, include_extras=True).items():
            flag = "--" + name.replace("_", "-")
            if flag in options and tp not in (str, bool, str | None, Folder):  # a folder path takes any name
                out.append((flag, tp))
    return out


FLAGS = _flags()


def test_every_setting_with_a_value_has_a_flag_here() -> None:
    names = {flag for flag, _ in FLAGS}
    assert {"--num-clients", "--beta", "--split-seed", "--split", "--metrics-port", "--wait-timeout", "--progress", "--bf16", "--threads"} <= names


@pytest.mark.parametrize(("flag", "tp"), FLAGS, ids=[f for f, _ in FLAGS])
def test_every_flag_refuses_a_value_of_the_wrong_type_in_one_line(flag: str, tp: Any, capsys) -> None:
    bad = "nope" if get_origin(tp) is Literal else "no-such-folder/2.5x"  # no number, id, address, existing path or folder to write in

    code = main([*BASE, flag, bad])

    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"feddiff worker: error: {flag} = {bad!r}: expected "), err


def test_flags_become_typed_settings() -> None:
    argv = [
        *BASE,
        "--num-clients",
        "3",
        "--beta",
        "0.25",
        "--split",
        "label",
        "--split-seed",
        "7",
        "--wait-timeout",
        "5",
        "--threads",
        "2",
        "--bf16",
        "off",
        "--no-compile",
        "--keep-running",
    ]
    args = build_parser().parse_args(argv)

    cfg = from_args(args)

    assert cfg.data == SplitConfig(num_clients=3, split="label", beta=0.25, split_seed=7)
    assert (cfg.client_index, cfg.wait_timeout, cfg.exit_when_done) == (0, 5.0, False)
    assert cfg.speed == SpeedConfig(bf16="off", compile="off", threads=2)


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--num-clients", "2.5"], "--num-clients = '2.5': expected an integer >= 1"),
        (["--channels", "2"], "--channels = '2': expected 1 (grayscale) or 3 (RGB)"),
        (["--metrics-port", "-2"], "--metrics-port = '-2': expected an integer in -1..65535"),
        (["--wait-timeout", "0"], "--wait-timeout = '0': expected more than 0 s, up to 604800 s (a week)"),
        (["--split", "dirichlet"], "--split = 'dirichlet': expected one of 'iid', 'quantity', 'label'"),
        (
            ["--tls-server-name", " "],
            "--tls-server-name = ' ': expected a DNS name (letters, digits, hyphens and dots) or an IP address; an empty name",
        ),
    ],
)
def test_the_worker_command_names_the_flag_its_value_and_what_it_takes(argv: list[str], line: str, capsys) -> None:
    assert main([*BASE, *argv]) == 2
    assert capsys.readouterr().err == f"feddiff worker: error: {line}\n"


def test_the_types_name_what_each_setting_takes() -> None:
    types = get_type_hints(WorkerConfig, include_extras=True)
    assert settings.expected(types["progress"]) == "one of 'auto', 'bar', 'log', 'off'"
    assert {f.name for f in fields(WorkerConfig)} >= {"speed", "backoff_initial", "backoff_max"}


def test_an_empty_state_dir_is_refused_not_taken_for_the_working_directory() -> None:
    from fedcore import settings

    with pytest.raises(settings.SettingsError, match=r"^--state-dir = '': expected a folder path$"):
        settings.build(WorkerConfig, {"coordinator": "localhost:50051", "client_index": 0, "state_dir": ""}, name=flags.flag)


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_nproc_per_node_takes_a_number_of_ranks_or_gpu(value: str, capsys) -> None:
    code = main([*BASE, "--nproc-per-node", value])

    assert code == 2
    err = capsys.readouterr().err
    assert f"--nproc-per-node = {value!r}: expected a number of ranks (1 or more), or gpu" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_nproc_per_node_gpu_is_refused_on_a_host_without_one(capsys) -> None:
    assert main([*BASE, "--nproc-per-node", "gpu"]) == 2
    assert "--nproc-per-node = 'gpu'" in capsys.readouterr().err


def test_more_cpu_ranks_than_the_host_has_cpus_are_refused_naming_the_value_and_the_cap(capsys) -> None:
    cpus = os.cpu_count() or 1
    for value in (str(cpus + 1), "100000"):
        assert main([*BASE, "--nproc-per-node", value, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"--nproc-per-node {value} asks for more ranks than this host's {cpus} CPUs" in err and f"give at most {cpus}" in err, err
    cfg = from_args(build_parser().parse_args([*BASE, "--nproc-per-node", str(cpus), "--device", "cpu"]))
    assert cfg.ranks_per_node == cpus


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_more_ranks_than_cpus_on_the_default_device_of_a_host_without_gpus_are_refused(capsys) -> None:
    assert main([*BASE, "--nproc-per-node", "100000"]) == 2
    assert f"--nproc-per-node 100000 asks for more ranks than this host's {os.cpu_count() or 1} CPUs" in capsys.readouterr().err


def test_several_cpu_ranks_are_a_setting_and_the_collective_timeout_a_number_of_seconds() -> None:
    cfg = from_args(build_parser().parse_args([*BASE, "--nproc-per-node", "2", "--device", "cpu", "--collective-timeout", "20"]))

    assert cfg.ranks_per_node == 2 and cfg.collective_timeout == 20.0
