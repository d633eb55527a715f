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
    ResumableSettings,
    RunConfig,
    RunState,
    global_file_name,
    load_private,
    load_run,
    load_state,
    save_private,
    save_run,
)
from fedcore.federation.robust import NormHistory
from fedcore.federation.strategies import Traffic
from fedcore.federation.totals import Ledger, Tally
from fedcore.model.parts import Part
from fedcore.payload.serialization import save_file
from tests.checkpoints import saved_run

CONFIG = RunConfig(strategy="udec", model="tiny", rounds=3, clients_per_round=0, seed=0, epochs=1, batch_size=8, lr=1e-4, loss="huber")
ENC, MID, DEC = Part.ENCODER, Part.BOTTLENECK, Part.DECODER
LEDGER = Ledger(
    Traffic(down={ENC: 200, MID: 300, DEC: 400}, up={ENC: 0, MID: 0, DEC: 800}), 3600, {ENC: 820, MID: 1230, DEC: 1640}, {ENC: 0, MID: 0, DEC: 3280}
)


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
    tally = Tally({"complete": 1}, {"accepted": 2})
    save_run(tmp_path, _weights(1.0), RunState(1, CONFIG, ("client-0",), LEDGER, global_file_name(1), tally))
    assert saved_run(tmp_path)[1].tally == tally

    state = json.loads((tmp_path / STATE_FILE).read_text())
    del state["tally"]  # as written before tallies existed
    (tmp_path / STATE_FILE).write_text(json.dumps(state))

    assert saved_run(tmp_path)[1].tally == Tally()


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


# state.json as this version's predecessors wrote it (a federation with a ledger, a tally, norms and the
# coordinator's settings, a mapping setting among them), keys sorted and indented by `atomic_write_json`
EARLIER_STATE = (
    '{"completed_rounds": 2, "config": {"batch_size": 128, "clients_per_round": 0, "epochs": 5, "loss": "huber", "lr": 0.0001, '
    '"model": "tiny", "rounds": 3, "seed": 3, "strategy": "udec"}, "contacted": ["w1", "w2"], "global_file": "global-r0002.safetensors", '
    '"ledger": {"bytes": {"down": {"bottleneck": 1230, "decoder": 1640, "encoder": 820}, "up": {"bottleneck": 0, "decoder": 3280, "encoder": 0}}, '
    '"full_fedavg_parameters": 3600, "parameters": {"down": {"bottleneck": 300, "decoder": 400, "encoder": 200}, '
    '"up": {"bottleneck": 0, "decoder": 800, "encoder": 0}}, "parameters_total": 1700, "reduction_vs_full": 0.5277777777777778}, '
    '"norms": {"decoder": [0.5, 1.25]}, "settings": {"insecure": true, "listen": "127.0.0.1:0", "quorum": 0.5, "round_deadline": 60.0, '
    '"rounds": 3, "worker_sizes": {"w1": 30, "w2": 40}}, '
    '"tally": {"round_attempts": {"complete": 2, "no_quorum": 1}, "updates": {"accepted": 4, "late": 1}}}'
)


def _earlier_state_file(folder: Path) -> str:
    """EARLIER_STATE written to `folder` as the file it was; its text."""
    text = json.dumps(json.loads(EARLIER_STATE), indent=2, sort_keys=True) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STATE_FILE).write_text(text)
    return text


def test_a_state_json_of_earlier_versions_reads_as_typed_records_and_is_written_back_as_it_was(tmp_path: Path) -> None:
    text = _earlier_state_file(tmp_path / "earlier")

    state = load_state(tmp_path / "earlier")
    assert state is not None
    save_run(tmp_path / "again", _weights(2.0), state)

    assert state.ledger == LEDGER and state.ledger.reduction_vs_full == pytest.approx(1 - 1700 / 3600)
    assert state.tally == Tally({"complete": 2, "no_quorum": 1}, {"accepted": 4, "late": 1})
    assert state.norms == NormHistory({DEC: (0.5, 1.25)})
    assert state.settings.values["worker_sizes"] == {"w1": 30, "w2": 40} and state.settings.values["insecure"] is True
    assert state.completed_rounds == 2 and state.contacted == ("w1", "w2") and state.config.seed == 3
    assert (tmp_path / "again" / STATE_FILE).read_text() == text, "written back byte for byte"


def test_the_settings_a_resume_changes_are_named_with_both_values() -> None:
    saved = ResumableSettings({"rounds": 2, "quorum": 0.5, "worker_sizes": {"w1": 30}})
    given = ResumableSettings({"rounds": 3, "quorum": 0.5, "worker_sizes": {"w1": 40}, "clip_norm": 1.0})

    assert saved.changed(given) == [("rounds", 2, 3), ("worker_sizes", {"w1": 30}, {"w1": 40})], "a setting saved by none is not compared"
    assert ResumableSettings().changed(given) == []


DROP = object()  # the key is taken out of state.json


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        (("completed_rounds",), "2", "completed_rounds is '2', expected an integer >= 0"),
        (("contacted",), ["w1", 2], "contacted is ['w1', 2], expected a list of client ids"),
        (("ledger", "bytes"), DROP, "ledger has no 'bytes'"),
        (("ledger", "parameters", "down"), 7, "ledger parameters.down is 7, expected a JSON object"),
        (("ledger", "parameters", "up", "decoder"), 8.5, "ledger parameters.up.decoder is 8.5, expected a count (an integer >= 0)"),
        (("ledger", "full_fedavg_parameters"), True, "ledger full_fedavg_parameters is True, expected a count"),
        (("tally", "updates", "late"), -1, "tally updates.late is -1, expected a count (an integer >= 0)"),
        (("tally", "round_attempts"), [], "tally round_attempts is [], expected a JSON object"),
        (("norms", "middle"), [1.0], "norms 'middle' is no part (encoder, bottleneck, decoder)"),
        (("norms", "decoder"), ["0.5"], "norms decoder is ['0.5'], expected a list of norms (finite numbers >= 0)"),
        (("settings",), [], "settings is [], expected a JSON object"),
        (("settings", "worker_sizes"), {"w1": [30]}, "settings worker_sizes is {'w1': [30]}, expected a JSON scalar or an object of them"),
    ],
)
def test_a_state_json_that_does_not_fit_is_refused_naming_the_file_the_key_and_the_value(
    path: tuple[str, ...], value: object, named: str, tmp_path: Path
) -> None:
    _earlier_state_file(tmp_path)
    state = json.loads((tmp_path / STATE_FILE).read_text())
    *outer, last = path
    holder = state
    for key in outer:
        holder = holder[key]
    if value is DROP:
        del holder[last]
    else:
        holder[last] = value
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


def test_versions_past_four_digits_are_found_and_pruned(tmp_path: Path) -> None:
    # Round 10,000 is the first whose file name has five digits: it is the newest, and the older ones go.
    for r in (9998, 9999, 10_000, 10_001):
        save_run(tmp_path, _weights(float(r)), _state(r))
        save_private(tmp_path / "clients", "client-0", r, _weights(-float(r)))

    newest = load_private(tmp_path / "clients", "client-0")

    assert newest is not None and newest[1] == 10_001 and _equal(newest[0], _weights(-10_001.0))
    assert checkpoint.global_versions(tmp_path) == [10_000, 10_001]
    assert _globals(tmp_path) == ["global-r10000.safetensors", "global-r10001.safetensors"]
    assert sorted(p.name for p in (tmp_path / "clients").iterdir()) == ["client-0-r10000.safetensors", "client-0-r10001.safetensors"]


def test_client_names_do_not_collide_when_pruning(tmp_path: Path) -> None:
    folder = tmp_path / "clients"
    save_private(folder, "client-1", 1, _weights(1.0))
    for r in range(1, 4):
        save_private(folder, "client-10", r, _weights(float(r)))

    found = load_private(folder, "client-1")

    assert found is not None and found[1] == 1
