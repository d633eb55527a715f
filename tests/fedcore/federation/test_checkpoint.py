"""Tests for fedcore.federation.checkpoint: roundtrips, crash safety between the model file and state.json, pruning."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fedcore.federation import checkpoint
from fedcore.federation.checkpoint import (
    STATE_FILE,
    RunConfig,
    RunState,
    global_file_name,
    load_private,
    load_run,
    load_state,
    save_private,
    save_run,
)
from fedcore.payload.serialization import save_file
from tests.checkpoints import saved_run

CONFIG = RunConfig(strategy="udec", model="tiny", rounds=3, clients_per_round=0, seed=0, epochs=1, batch_size=8, lr=1e-4, loss="huber")
LEDGER = {"parameters_total": 123}


def _state(completed: int, contacted=("client-0", "client-1")) -> RunState:
    return RunState(
        completed_rounds=completed,
        config=CONFIG,
        contacted=tuple(contacted),
        ledger=LEDGER,
        global_file=global_file_name(completed),
    )


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.full((3, 2), value), "b.bias": torch.arange(4, dtype=torch.float32) + value}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _globals(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("global-"))


def test_empty_directory_has_no_checkpoint(tmp_path: Path) -> None:
    assert load_run(tmp_path) is None
    assert load_private(tmp_path / "clients", "client-0") is None


def test_save_and_load_roundtrip(tmp_path: Path) -> None:
    state = _state(1, contacted=("client-1", "client-0"))

    save_run(tmp_path, _weights(1.0), state)
    loaded = load_run(tmp_path)

    assert loaded is not None
    tensors, got = loaded
    assert _equal(tensors, _weights(1.0))
    assert got.completed_rounds == 1
    assert got.config == CONFIG and got.ledger == LEDGER
    assert got.contacted == ("client-0", "client-1")
    assert got.global_file == "global-r0001.safetensors"
    assert json.loads((tmp_path / STATE_FILE).read_text())["global_file"] == got.global_file
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_tally_is_saved_and_a_state_json_without_one_loads(tmp_path: Path) -> None:
    tally = {"round_attempts": {"complete": 1}, "updates": {"accepted": 2}}
    save_run(tmp_path, _weights(1.0), RunState(1, CONFIG, ("client-0",), LEDGER, global_file_name(1), tally))
    assert saved_run(tmp_path)[1].tally == tally

    state = json.loads((tmp_path / STATE_FILE).read_text())
    del state["tally"]  # as written before tallies existed
    (tmp_path / STATE_FILE).write_text(json.dumps(state))

    assert saved_run(tmp_path)[1].tally == {}


def test_the_config_of_an_earlier_version_loads_and_is_written_as_it_was(tmp_path: Path) -> None:
    save_run(tmp_path, _weights(1.0), _state(1))
    state = json.loads((tmp_path / STATE_FILE).read_text())
    # As every version wrote it: the run's settings by name, compression only when the run has some.
    assert state["config"] == {
        "strategy": "udec",
        "model": "tiny",
        "rounds": 3,
        "clients_per_round": 0,
        "seed": 0,
        "epochs": 1,
        "batch_size": 8,
        "lr": 1e-4,
        "loss": "huber",
    }
    state["config"] = {"compression": "int8", **state["config"], "lr": 1}  # an lr JSON wrote as an integer
    (tmp_path / STATE_FILE).write_text(json.dumps(state))

    config = saved_run(tmp_path)[1].config

    assert config == RunConfig(
        strategy="udec", model="tiny", rounds=3, clients_per_round=0, seed=0, epochs=1, batch_size=8, lr=1.0, loss="huber", compression="int8"
    )
    assert config.as_json() == state["config"]


@pytest.mark.parametrize(
    ("change", "named"),
    [({"seed": None}, "config has no 'seed'"), ({"epochs": "5"}, "config epochs is '5', expected int"), ({"lr": True}, "config lr is True, expected float")],
)
def test_a_config_that_is_not_a_runs_is_refused_naming_the_file_and_key(change: dict[str, object], named: str, tmp_path: Path) -> None:
    save_run(tmp_path, _weights(1.0), _state(1))
    state = json.loads((tmp_path / STATE_FILE).read_text())
    state["config"] = {k: v for k, v in {**state["config"], **change}.items() if v is not None}
    (tmp_path / STATE_FILE).write_text(json.dumps(state))

    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / STATE_FILE}: {named}")):
        load_state(tmp_path)


def test_crash_before_state_json_keeps_the_committed_checkpoint(tmp_path: Path) -> None:
    save_run(tmp_path, _weights(1.0), _state(1))
    save_run(tmp_path, _weights(2.0), _state(2))
    # The next round wrote its model file, then the process died before committing state.json.
    save_file(tmp_path / global_file_name(3), _weights(3.0), {"completed_rounds": "3"})

    loaded = load_run(tmp_path)

    assert loaded is not None
    tensors, state = loaded
    assert state.completed_rounds == 2
    assert _equal(tensors, _weights(2.0))


def test_crash_after_pruning_window_still_loads(tmp_path: Path) -> None:
    for r in (1, 2, 3):
        save_run(tmp_path, _weights(float(r)), _state(r))
    save_file(tmp_path / global_file_name(4), _weights(4.0))  # uncommitted

    # Resuming rewrites round 4 and commits it: the stale file is replaced, and two versions remain.
    save_run(tmp_path, _weights(40.0), _state(4))

    tensors, state = saved_run(tmp_path)
    assert state.completed_rounds == 4 and _equal(tensors, _weights(40.0))
    assert _globals(tmp_path) == ["global-r0003.safetensors", "global-r0004.safetensors"]


def test_pruning_keeps_the_last_two_global_versions(tmp_path: Path) -> None:
    for r in range(1, 6):
        save_run(tmp_path, _weights(float(r)), _state(r))

    assert checkpoint.KEEP == 2
    assert _globals(tmp_path) == ["global-r0004.safetensors", "global-r0005.safetensors"]
    tensors, state = saved_run(tmp_path)
    assert state.completed_rounds == 5 and _equal(tensors, _weights(5.0))


def test_private_parts_roundtrip_and_pruning(tmp_path: Path) -> None:
    folder = tmp_path / "clients"
    for r in range(1, 5):
        save_private(folder, "client-0", r, _weights(10.0 + r))
    save_private(folder, "client-1", 1, _weights(-1.0))

    newest = load_private(folder, "client-0")
    at_three = load_private(folder, "client-0", completed_rounds=3)
    too_old = load_private(folder, "client-0", completed_rounds=2)  # pruned
    other = load_private(folder, "client-1", completed_rounds=4)

    assert newest is not None and newest[1] == 4 and _equal(newest[0], _weights(14.0))
    assert at_three is not None and at_three[1] == 3 and _equal(at_three[0], _weights(13.0))
    assert too_old is None
    assert other is not None and other[1] == 1 and _equal(other[0], _weights(-1.0))
    assert sorted(p.name for p in folder.iterdir()) == [
        "client-0-r0003.safetensors",
        "client-0-r0004.safetensors",
        "client-1-r0001.safetensors",
    ]


def test_client_names_do_not_collide_when_pruning(tmp_path: Path) -> None:
    folder = tmp_path / "clients"
    save_private(folder, "client-1", 1, _weights(1.0))
    for r in range(1, 4):
        save_private(folder, "client-10", r, _weights(float(r)))

    found = load_private(folder, "client-1")

    assert found is not None and found[1] == 1
