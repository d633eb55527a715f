"""The worker's settings from flags (its speed settings included): every value converted to its setting's
type or refused at start in one line that names the flag, the value and what was expected."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, get_origin, get_type_hints

import pytest
import torch

from fedcore import settings
from fedcore.data.shards import SplitConfig
from fedcore.errors import SettingsError
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
        (
            ["--tls-server-name", ""],
            "--tls-server-name = '': expected a DNS name (letters, digits, hyphens and dots) or an IP address; the flag is given empty",
        ),
        (["--worker-id", ""], "--worker-id = '': expected a worker id of 1..128 characters of [A-Za-z0-9._-]; the flag is given empty"),
        (["--token-file", ""], "--token-file = '': expected a readable file; the flag is given empty"),
        (["--ready-file", ""], "--ready-file = '': expected a new file in an existing folder, or an earlier ready file; the flag is given empty"),
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

    with pytest.raises(SettingsError, match=r"^--state-dir = '': expected a folder path$"):
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
        assert err.startswith(f"feddiff worker: error: --nproc-per-node {value} on the CPU (--device cpu): {value} training processes, one per device: "), err
        assert f"more than this machine's {cpus} CPUs (each takes one at least); give at most {cpus}" in err, err
    cfg = from_args(build_parser().parse_args([*BASE, "--nproc-per-node", str(cpus), "--device", "cpu"]))
    assert cfg.ranks_per_node == cpus


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_more_ranks_than_cpus_on_the_default_device_of_a_host_without_gpus_are_refused(capsys) -> None:
    assert main([*BASE, "--nproc-per-node", "100000"]) == 2
    assert (
        f"--nproc-per-node 100000 on the CPU (--device auto): 100000 training processes, one per device: more than this machine's {os.cpu_count() or 1} CPUs"
        in (capsys.readouterr().err)
    )


def test_a_workers_ranks_and_simulates_devices_are_refused_by_one_check_in_the_same_words(tmp_path: Path, capsys) -> None:
    cpus = os.cpu_count() or 1
    assert main([*BASE, "--nproc-per-node", str(cpus + 1), "--device", "cpu"]) == 2
    worker = capsys.readouterr().err
    assert main(["simulate", "--devices", ",".join(["cpu"] * (cpus + 1)), "--out-dir", str(tmp_path / "out")]) == 2
    simulate = capsys.readouterr().err

    words = f"{cpus + 1} training processes, one per device: more than this machine's {cpus} CPUs (each takes one at least); give at most {cpus}\n"
    assert worker.endswith(words) and simulate.endswith(words), (worker, simulate)


@pytest.mark.skipif(torch.cuda.device_count() > 2, reason="this host has the GPU the third rank would take")
def test_more_cuda_ranks_than_the_host_has_gpus_are_refused_naming_the_missing_one(capsys) -> None:
    from fedcore.model import training

    training_problem = training.device_problem
    gpus = torch.cuda.device_count()
    with pytest.MonkeyPatch.context() as mp:  # a host that shows CUDA (a rank's device need not exist to be checked)
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "device_count", lambda: gpus)
        mp.setattr(training, "device_problem", lambda name: None if name in ("auto", "cuda", "cpu") else training_problem(name))
        assert main([*BASE, "--nproc-per-node", "3", "--device", "cuda"]) == 2

    err = capsys.readouterr().err
    assert err.startswith(
        f"feddiff worker: error: --nproc-per-node 3 on CUDA GPUs, rank r on cuda:r (--device cuda): device 'cuda:{gpus}': no such device here"
    ), err


def test_several_cpu_ranks_are_a_setting_and_the_collective_timeout_a_number_of_seconds() -> None:
    cfg = from_args(build_parser().parse_args([*BASE, "--nproc-per-node", "2", "--device", "cpu", "--collective-timeout", "20"]))

    assert cfg.ranks_per_node == 2 and cfg.collective_timeout == 20.0


@pytest.mark.parametrize(
    ("ranks", "env", "threads", "set_to"),
    [
        (1, {}, 0, None),  # one process: torch's default
        (1, {}, 3, 3),
        (4, {"LOCAL_WORLD_SIZE": "4"}, 0, 2),  # 8 threads shared out between 4 ranks, as simulate shares them
        (4, {"LOCAL_WORLD_SIZE": "4"}, 5, 5),
        (4, {"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "3"}, 0, None),  # torchrun's convention: each rank its own
    ],
)
def test_a_rank_takes_its_share_of_the_hosts_threads_as_simulates_processes_do(
    ranks: int, env: dict[str, str], threads: int, set_to: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedcore.model import training
    from fedcore.model.ranks import Ranks
    from worker import launch

    for name in ("LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(training.torch, "get_num_threads", lambda: 8)
    calls: list[int] = []
    monkeypatch.setattr(launch.torch, "set_num_threads", calls.append)

    launch._set_threads(SpeedConfig(threads=threads), Ranks(rank=0, world_size=ranks))

    assert calls == ([] if set_to is None else [set_to])


@pytest.mark.parametrize("text", ["", " \n\t"])
def test_a_token_file_is_read_at_start_and_an_empty_or_blank_one_is_refused_naming_it(text: str, tmp_path: Path, capsys) -> None:
    token = tmp_path / "token"
    token.write_text(text)

    assert main([*BASE, "--token-file", str(token)]) == 2
    assert (
        capsys.readouterr().err == f"feddiff worker: error: --token-file = {str(token)!r}: expected a readable file; the file is empty or holds only blanks\n"
    )


def test_a_token_file_that_holds_a_token_is_taken(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")

    assert from_args(build_parser().parse_args([*BASE, "--token-file", str(token)])).token_file == str(token)
