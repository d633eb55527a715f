"""A worker's state dir: one process at a time (a lock), an identity that tells a restart from another
worker, and private parts whose failed save (a full disk) keeps the files saved before and is retried."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from fedcore.atomic import LOCK_FILE
from fedcore.federation.checkpoint import load_private
from tests.tmpfs import fill, mounted_tmpfs, remount
from worker.metrics import Metrics
from worker.state_dir import IDENTITY_FILE, StateDir, StateDirError, UnsavedPrivate

PRIVATE_BYTES = 100_000  # one private-rNNNN.safetensors file, about


def _private(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"downs.0.weight": torch.randn(PRIVATE_BYTES // 8, generator=g), "mid.weight": torch.randn(PRIVATE_BYTES // 8, generator=g)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def _open(path: Path, worker_id: str = "hospital-1", metrics: Metrics | None = None) -> StateDir:
    return StateDir.open(path, worker_id, metrics or Metrics())


# --- identity -----------------------------------------------------------------------------------------------
def test_the_installation_id_is_saved_and_the_instance_id_is_new_in_every_process(tmp_path: Path) -> None:
    first = _open(tmp_path / "state")
    first.close()
    second = _open(tmp_path / "state")

    assert json.loads((tmp_path / "state" / IDENTITY_FILE).read_text()) == {"worker_id": "hospital-1", "installation_id": first.identity.installation_id}
    assert second.identity.installation_id == first.identity.installation_id and len(first.identity.installation_id) == 32
    assert second.identity.instance_id != first.identity.instance_id


def test_an_identity_without_installation_id_gets_one_and_keeps_its_worker_id(tmp_path: Path) -> None:
    (tmp_path / IDENTITY_FILE).write_text(json.dumps({"worker_id": "saved-id"}))

    state = _open(tmp_path, worker_id="")

    assert state.identity.worker_id == "saved-id"
    assert json.loads((tmp_path / IDENTITY_FILE).read_text())["installation_id"] == state.identity.installation_id


def test_another_worker_id_is_refused_where_private_parts_are_saved(tmp_path: Path) -> None:
    """Renamed with private parts saved, a worker trained a run's rounds with another worker's encoder."""
    before = _open(tmp_path, worker_id="hospital-1")
    before.save_private(2, {"enc.w": torch.ones(2)})
    before.close()

    with pytest.raises(StateDirError, match=r"holds the private parts of worker 'hospital-1', not 'hospital-9': give 'hospital-9' a state dir"):
        _open(tmp_path, worker_id="hospital-9")
    assert json.loads((tmp_path / IDENTITY_FILE).read_text())["worker_id"] == "hospital-1"
    assert _open(tmp_path, worker_id="hospital-1").load_private() is not None


def test_a_new_worker_id_on_the_same_state_dir_keeps_its_installation(tmp_path: Path) -> None:
    before = _open(tmp_path, worker_id="old-name")
    before.close()

    after = _open(tmp_path, worker_id="new-name")

    assert (after.identity.worker_id, after.identity.installation_id) == ("new-name", before.identity.installation_id)


def test_a_corrupt_identity_file_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / IDENTITY_FILE).write_text('{"worker_id": "hosp')
    with pytest.raises(StateDirError, match=f"{IDENTITY_FILE}' is not a worker identity"):
        _open(tmp_path)


# --- one process per state dir ------------------------------------------------------------------------------
def test_a_second_opener_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    first = _open(tmp_path)

    with pytest.raises(StateDirError, match=rf"--state-dir '{tmp_path}' is in use by another worker process \(pid {os.getpid()}\)"):
        _open(tmp_path)
    first.close()
    _open(tmp_path).close()
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_a_default_state_dir_in_use_is_named_as_the_default(tmp_path: Path) -> None:
    first = _open(tmp_path)
    with pytest.raises(StateDirError, match=rf"^--state-dir '{tmp_path}' \(the default\) is in use by another worker process"):
        StateDir.open(tmp_path, "hospital-1", Metrics(), default=True)
    first.close()


def test_temporary_files_of_an_interrupted_write_are_removed(tmp_path: Path) -> None:
    left = tmp_path / ".private-r0002.safetensors.tmp-4242"
    left.write_bytes(b"half a file")
    kept = tmp_path / "notes.tmp-1"

    kept.write_text("not ours")
    _open(tmp_path)

    assert not left.exists() and kept.exists()


def test_a_file_given_as_the_state_dir_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("not a folder")

    with pytest.raises(StateDirError) as info:
        _open(tmp_path / "notes")

    assert str(info.value) == f"--state-dir '{tmp_path / 'notes'}' is a file, not a folder: give a folder (created if missing)"
    assert (tmp_path / "notes").read_text() == "not a folder"


def test_a_file_where_the_state_dir_would_be_made_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("not a folder")

    with pytest.raises(StateDirError) as info:
        _open(tmp_path / "notes" / "state")

    assert (
        str(info.value)
        == f"--state-dir '{tmp_path / 'notes' / 'state'}' cannot be made: '{tmp_path / 'notes'}' is a file, not a folder: give a folder (created if missing)"
    )


def test_a_read_only_state_dir_is_an_error_naming_it(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "state", "1m") as state:
        remount(state, "ro")
        with pytest.raises(StateDirError, match=f"--state-dir '{state}' .*Read-only file system"):
            _open(state)


def test_a_full_state_dir_at_the_first_start_is_an_error_naming_it_and_not_at_a_restart(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "state", "1m") as state:
        (state / "other").mkdir()
        fill(state / "other")
        with pytest.raises(StateDirError, match=f"--state-dir '{state}': cannot save the worker's identity in {IDENTITY_FILE}: No space left on device"):
            _open(state)
        (state / "other" / "filler").unlink()
        _open(state).close()
        fill(state / "other")

        restarted = _open(state)  # the identity is saved: a full disk is only a problem for later saves

        assert restarted.identity.worker_id == "hospital-1"


# --- private parts on a disk that fills up -------------------------------------------------------------------
def test_a_failed_save_keeps_the_saved_files_and_the_parts_in_memory_until_a_retry_succeeds(tmp_path: Path) -> None:
    metrics = Metrics()
    with mounted_tmpfs(tmp_path / "state", "1m") as path:
        state = _open(path, metrics=metrics)
        assert state.save_private(1, _private(1)) and state.save_private(2, _private(2))
        saved = {f.name: _sha(f) for f in path.glob("private-r*.safetensors")}
        filler = fill(path)

        assert not state.save_private(3, _private(3))
        assert not state.retry(), "still full"

        assert {f.name: _sha(f) for f in path.glob("private-r*.safetensors")} == saved, "nothing pruned, nothing torn"
        assert [f.name for f in path.iterdir() if ".tmp-" in f.name] == []
        assert state.unsaved is not None and state.unsaved.completed_rounds == 3
        assert _value(metrics, "feddiff_private_state_unsaved") == 1
        assert _value(metrics, "feddiff_state_saves_total", outcome="failed") == 2

        filler.unlink()
        assert state.retry()

        assert state.unsaved is None and _value(metrics, "feddiff_private_state_unsaved") == 0
        assert sorted(f.name for f in path.glob("private-r*.safetensors")) == ["private-r0002.safetensors", "private-r0003.safetensors"]
        loaded = state.load_private()
        assert loaded is not None
        tensors, completed = loaded
        assert completed == 3 and all(torch.equal(tensors[k], v) for k, v in _private(3).items())
        assert _value(metrics, "feddiff_state_saves_total", outcome="saved") == 3


def test_a_newer_save_replaces_older_unsaved_parts(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "state", "1m") as path:
        state = _open(path)
        filler = fill(path)
        assert not state.save_private(1, _private(1))
        assert not state.save_private(2, _private(2))
        filler.unlink()

        assert state.retry()

        assert [f.name for f in path.glob("private-r*.safetensors")] == ["private-r0002.safetensors"]


# --- one run's private parts ---------------------------------------------------------------------------------
RUN_A, RUN_B = "a" * 32, "b" * 32


def test_parts_saved_before_run_ids_are_of_an_unknown_run_and_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The safe choice: parts whose run is unknown are never loaded into a run (they might be another's), and
    never deleted (they might be this one's: the operator can move them back)."""
    state = _open(tmp_path)
    state.save_private(3, _private(0))
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "r0002.png").write_bytes(b"png")
    before = _sha(tmp_path / "private-r0003.safetensors")

    assert state.enter_run(RUN_A) is True

    (aside,) = (tmp_path / "previous-runs").iterdir()
    assert aside.name.startswith("unknown-") and _sha(aside / "private-r0003.safetensors") == before
    assert (aside / "samples" / "r0002.png").read_bytes() == b"png"
    assert state.load_private() is None and json.loads((tmp_path / "run.json").read_text()) == {"run_id": RUN_A}
    assert "held the private parts and sample grids of a run of unknown id (saved before run ids)" in caplog.text


def test_the_same_run_keeps_its_parts_and_a_new_run_starts_without_them(tmp_path: Path) -> None:
    state = _open(tmp_path)
    assert state.enter_run(RUN_A) is False  # nothing here yet
    state.save_private(1, _private(1))
    assert state.enter_run(RUN_A) is False and state.load_private() is not None

    assert state.enter_run(RUN_B) is True
    assert state.load_private() is None and (tmp_path / "previous-runs" / RUN_A / "private-r0001.safetensors").exists()
    state.save_private(1, _private(2))
    assert state.enter_run(RUN_A) is True  # back: A's own parts, B's aside
    found = state.load_private()
    assert found is not None and torch.equal(found[0]["mid.weight"], _private(1)["mid.weight"])
    assert (tmp_path / "previous-runs" / RUN_B / "private-r0001.safetensors").exists() and not (tmp_path / "previous-runs" / RUN_A).exists()


def test_parts_held_unsaved_for_another_run_are_saved_aside_not_into_the_new_run(tmp_path: Path) -> None:
    state = _open(tmp_path)
    state.enter_run(RUN_A)
    state.unsaved = UnsavedPrivate(4, _private(4))  # as after a failed save

    assert state.enter_run(RUN_B) is True

    assert state.unsaved is None and state.load_private() is None
    assert torch.equal(load_private(tmp_path / "previous-runs" / RUN_A, "private")[0]["mid.weight"], _private(4)["mid.weight"])


@pytest.mark.parametrize("run_id", ["", "../x", "A" * 32, "f" * 65])
def test_a_run_id_that_is_no_id_is_refused_before_anything_moves(tmp_path: Path, run_id: str) -> None:
    state = _open(tmp_path)
    state.save_private(1, _private(1))
    with pytest.raises(ValueError, match="the coordinator's run id"):
        state.enter_run(run_id)
    assert state.load_private() is not None and not (tmp_path / "previous-runs").exists()


# --- error-feedback residuals -------------------------------------------------------------------------------
def test_residuals_are_kept_beside_the_private_parts_across_a_restart(tmp_path: Path) -> None:
    state = _open(tmp_path)
    state.save_private(2, _private(1))
    assert state.save_residuals(2, _private(2)) and state.save_residuals(3, _private(3))
    state.close()

    again = _open(tmp_path)
    residuals, private = again.load_residuals(), again.load_private()

    assert residuals is not None and residuals[1] == 3
    assert all(torch.equal(residuals[0][n], t) for n, t in _private(3).items())
    assert private is not None and private[1] == 2 and all(torch.equal(private[0][n], t) for n, t in _private(1).items())


@pytest.mark.parametrize("stem", ["private", "residual"])
def test_a_corrupt_saved_file_is_an_error_naming_it_and_stays_as_it_was(tmp_path: Path, stem: str) -> None:
    state = _open(tmp_path)
    bad = tmp_path / f"{stem}-r0001.safetensors"
    bad.write_bytes(b"garbage\n")
    load = state.load_private if stem == "private" else state.load_residuals

    with pytest.raises(StateDirError, match=rf"{bad.name}.*move that file aside"):
        load()
    assert bad.read_bytes() == b"garbage\n"
