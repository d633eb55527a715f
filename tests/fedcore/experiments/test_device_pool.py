"""Tests for fedcore.experiments.devices: `--devices cpu,cpu` trains a round's clients in two processes to the
bytes of the sequential run (simulate and reproduce), a process that raises or dies ends the run with its
error, and the devices setting is checked at the edge."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from fedcore.atomic import LOCK_FILE
from fedcore.data.shards import SplitConfig
from fedcore.errors import TrainingProcessFailed
from fedcore.experiments import devices
from fedcore.experiments.devices import DevicePool, parse_devices
from fedcore.experiments.simulation import Simulation, SimulationConfig
from fedcore.federation.engine import FederationConfig, OpenRound
from fedcore.federation.strategies import Strategy
from fedcore.model import training
from fedcore.model.training import SpeedConfig, TrainConfig, threads_per_process
from feddiff.cli import main

SIM = ["--model", "tiny", "--rounds", "2", "--num-clients", "3", "--max-images", "150", "--epochs", "1", "--batch-size", "32", "--seed", "3", "--threads", "1"]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder by relative path but its lock (which names the process); the round log without
    its wall times."""
    found = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_FILE}
    for name, data in found.items():
        if name.endswith(".jsonl") and name != "results.jsonl":
            rows = [json.loads(line) for line in data.decode().splitlines()]
            found[name] = json.dumps([{k: v for k, v in row.items() if k != "seconds"} for row in rows]).encode()
    return found


# --- the same bytes as the sequential run ---------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "compression"), [("full", "none"), ("udec", "none"), ("udec", "topk:0.05+int8")])
def test_simulate_on_two_cpu_processes_writes_the_sequential_runs_files(strategy: str, compression: str, tmp_path: Path, fashion_mnist_dir: Path) -> None:
    sequential, parallel = tmp_path / "sequential", tmp_path / "parallel"
    run = [*SIM, "--strategy", strategy, "--compression", compression]

    assert main(["simulate", *run, "--device", "cpu", "--out-dir", str(sequential)]) == 0
    assert main(["simulate", *run, "--devices", "cpu,cpu", "--out-dir", str(parallel)]) == 0

    files = _files(sequential)
    assert any(name.startswith("global-r0002") for name in files)
    assert strategy == "full" or "clients/client-2-r0002.safetensors" in files, "udec keeps private parts"
    assert compression == "none" or {"residuals/client-2-r0002.safetensors", "shared-r0002.safetensors"} <= set(files), (
        "the error feedback and the shared model"
    )
    assert _files(parallel) == files


def test_reproduce_of_a_cell_on_two_cpu_processes_equals_the_sequential_one(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    common = ["reproduce", "--protocol", "mini", "--only", "udec:iid", "--num-clients", "2", "--no-docs", "--threads", "1", "--device", "cpu"]
    common += ["--samples", "16", "--curve-samples", "16"]  # the FDs of the same weights and noise: a few samples tell

    assert main([*common, "--out-dir", str(tmp_path / "sequential")]) == 0
    assert main([*common, "--devices", "cpu,cpu", "--out-dir", str(tmp_path / "parallel")]) == 0

    cells = {run: _files(tmp_path / run / "udec-iid") for run in ("sequential", "parallel")}
    rows = {run: json.loads((tmp_path / run / "results.jsonl").read_text()) for run in cells}
    assert "global-r0002.safetensors" in cells["sequential"] and "evaluations.jsonl" in cells["sequential"]
    assert cells["parallel"] == cells["sequential"]
    for key in ("fd_mean", "fd_std", "fd_per_model", "losses", "parameters_exchanged"):
        assert rows["parallel"][key] == rows["sequential"][key], key
    curves = {run: [{k: v for k, v in point.items() if k != "seconds"} for point in row["curve"]] for run, row in rows.items()}
    assert curves["parallel"] == curves["sequential"]
    model = rows["sequential"]["device"].removeprefix("cpu: ").rsplit(", ", 1)[0]
    assert rows["parallel"]["device"] == f"cpu x2: {model}, 1 thread each", rows["parallel"]["device"]


# --- a process that fails ends the run ------------------------------------------------------------------------


def _config(strategy: Strategy = Strategy.FULL) -> SimulationConfig:
    return SimulationConfig(
        federation=FederationConfig(strategy=strategy, model="tiny", rounds=2, seed=1, train=TrainConfig(epochs=1, batch_size=32)),
        data=SplitConfig(num_clients=3, split="iid", max_images=90),
        speed=SpeedConfig(device="cpu", threads=1),
    )


@pytest.mark.timeout(300)
def test_a_process_that_raises_ends_simulate_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fashion_mnist_dir: Path
) -> None:
    job = Simulation._job

    def corrupt(self: Simulation, open_round: OpenRound, cid: str) -> devices.ClientJob:
        made = job(self, open_round, cid)
        return replace(made, payload=b"no safetensors") if cid == "client-1" else made

    monkeypatch.setattr(Simulation, "_job", corrupt)

    code = main(["simulate", *SIM, "--devices", "cpu,cpu", "--out-dir", str(tmp_path / "run")])

    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert err[-1].startswith("feddiff simulate: error: training 'client-1' on cpu (process "), err
    assert "the process failed: fedcore.errors.NotSafetensors: safetensors header length" in err[-1], err
    assert not (tmp_path / "run" / "global-r0001.safetensors").exists(), "no round was committed"


@pytest.mark.timeout(300)
def test_a_process_that_dies_ends_the_round_and_the_other_processes(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    pool = DevicePool(["cpu", "cpu"], SpeedConfig(device="cpu", threads=1))
    processes = [p.process for p in pool._processes]
    sim = Simulation.create(_config(), tmp_path / "run", log=lambda _: None, pool=pool)

    os.kill(pool.pids[1], signal.SIGKILL)
    with pytest.raises(TrainingProcessFailed, match=r"on cpu \(process 2, pid \d+\): the process (died|cannot be reached)"):
        sim.run_round()

    assert not any(p.is_alive() for p in processes)
    with pytest.raises(TrainingProcessFailed, match="closed"):
        sim.run_round()


def test_a_pool_serves_one_simulation_after_another(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    """reproduce keeps its processes for every cell: each simulation's setup replaces the clients before it."""
    with DevicePool(["cpu", "cpu"], SpeedConfig(device="cpu", threads=1)) as pool:
        first = Simulation.create(_config(Strategy.UDEC), tmp_path / "a", log=lambda _: None, pool=pool)
        first.run()
        second = Simulation.create(replace(_config(), data=replace(_config().data, num_clients=2)), tmp_path / "b", log=lambda _: None, pool=pool)
        second.run()
    alone = Simulation.create(replace(_config(), data=replace(_config().data, num_clients=2)), tmp_path / "c", log=lambda _: None)
    alone.run()

    assert _files(tmp_path / "b") == _files(tmp_path / "c")
    assert [r.mean_loss for r in second.records] == [r.mean_loss for r in alone.records]


# --- the devices setting --------------------------------------------------------------------------------------


def test_devices_may_repeat_and_are_checked_against_this_machine() -> None:
    assert parse_devices("cpu, cpu") == ("cpu", "cpu")
    assert parse_devices(["cpu"]) == ("cpu",)
    for given, words in [
        ("cuda:7", "device 'cuda:7': no such device here"),
        ("gpu0", "device 'gpu0': not a device name"),
        ("auto", "entry 'auto'"),
        ("cpu,,cpu", "entry ''"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_devices(given)


def test_devices_of_two_kinds_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training, "device_problem", lambda name: None)  # as on a machine with a GPU

    assert parse_devices("cuda,cuda:1") == ("cuda:0", "cuda:1")
    with pytest.raises(ValueError, match="devices of kinds cpu, cuda"):
        parse_devices("cuda:0,cpu")


def test_threads_are_shared_out_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training.torch, "get_num_threads", lambda: 8)

    assert threads_per_process(2) == 4
    assert threads_per_process(3) == 2
    assert threads_per_process(16) == 1
    assert threads_per_process(2, threads=1) == 1


@pytest.mark.parametrize("command", ["simulate", "reproduce"])
def test_a_missing_device_is_refused_at_start_naming_it(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([command, "--devices", "cpu,cuda:5", "--out-dir", str(tmp_path / "out"), *(["--no-docs"] if command == "reproduce" else [])])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"feddiff {command}: error: --devices = 'cpu,cuda:5': expected a comma list of devices") and "device 'cuda:5'" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["simulate", "reproduce"])
def test_more_devices_than_cpus_are_refused_at_start_naming_them_and_the_cap(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cpus = os.cpu_count() or 1
    given = ",".join(["cpu"] * (cpus + 1))
    code = main([command, "--devices", given, "--out-dir", str(tmp_path / "out"), *(["--no-docs"] if command == "reproduce" else [])])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"feddiff {command}: error: --devices = {given!r}: expected a comma list of devices"), err
    assert f"{cpus + 1} training processes, one per device: more than this machine's {cpus} CPUs (each takes one at least); give at most {cpus}" in err, err
    assert not (tmp_path / "out").exists()
    assert len(parse_devices(["cpu"] * cpus)) == cpus


def test_simulate_takes_devices_or_a_device_not_both(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--devices", "cpu,cpu", "--device", "cpu", "--out-dir", str(tmp_path / "out")]) == 2

    assert "--device cpu and --devices cpu,cpu: give one" in capsys.readouterr().err
