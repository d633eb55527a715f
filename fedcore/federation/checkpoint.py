"""Run checkpoints: the global model and the round state, written so a crash at any point leaves a valid one.

Layout of a checkpoint directory:
  global-r0003.safetensors   global model after 3 completed rounds (the last two are kept)
  state.json                 the commit point: completed rounds, config, ledger, outcome tally, update norms, the
                             settings that may change on resume, which file is current
  rounds.jsonl               the round log: one JSON line per closed round (fedcore.federation.roundlog)
  final.safetensors          the global model after the last round (the coordinator's)
  run.json                   {"run_id"}: the run's identity, created with the run and kept across --resume
  clients/<id>-r0003.safetensors  a client's private parts (simulation and workers' --state-dir)
A round is committed when state.json names its files; files of an uncommitted round are ignored. A new run
never starts in a folder that holds one (`run_in`): its files would overwrite and prune the other's."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import torch

from fedcore.atomic import atomic_write_json, naming
from fedcore.federation.robust import NormHistory
from fedcore.federation.totals import Ledger, Tally
from fedcore.payload.serialization import load_file, save_file

STATE_FILE = "state.json"
ROUNDS_LOG = "rounds.jsonl"
FINAL_MODEL = "final.safetensors"
RUN_FILE = "run.json"
PREVIOUS_RUNS = "previous-runs"  # in a worker's --state-dir: previous-runs/<run id>/, the files of other runs
KEEP = 2


@dataclass(frozen=True)
class RunConfig:
    """The settings of a run as its checkpoint records them (state.json's "config", `FederationConfig.record`):
    those that define it and the rounds it is to run, flat, in JSON's types."""

    strategy: str  # a strategy's name (fedcore.federation.strategies.Strategy)
    model: str  # model preset
    rounds: int
    clients_per_round: int  # 0 = every available client
    seed: int
    epochs: int
    batch_size: int
    lr: float
    loss: str  # fedcore.model.diffusion.LossKind
    compression: str = "none"  # the codec's name, its block included; a run without one does not record it

    def as_json(self) -> dict[str, object]:
        """state.json's "config": compression only when there is some, so that earlier versions resume the run."""
        saved = {f.name: getattr(self, f.name) for f in fields(self)}
        compression = saved.pop("compression")
        return {"compression": compression, **saved} if compression != "none" else saved

    @classmethod
    def from_json(cls, obj: object, where: Path) -> RunConfig:
        """From state.json's "config" as `as_json` writes it (the checkpoints of every version); ValueError naming
        `where` and the key for anything else."""
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: config is {obj!r}, expected a JSON object")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in obj:
                if f.default is MISSING:
                    raise ValueError(f"{where}: config has no {f.name!r}")
                continue
            value = obj[f.name]
            if not _is_json(value, str(f.type)):  # f.type: the annotation's text
                raise ValueError(f"{where}: config {f.name} is {value!r}, expected {f.type}")
            values[f.name] = float(value) if f.type == "float" else value
        return cls(**values)


_JSON_TYPES: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float)}


def _is_json(value: object, annotation: str) -> bool:
    """Whether JSON gave `value` as a field annotated `annotation` takes it (an integer for a float too; no bool)."""
    return isinstance(value, _JSON_TYPES[annotation]) and not isinstance(value, bool)


JsonScalar: TypeAlias = str | int | float | bool | None
SettingValue: TypeAlias = JsonScalar | Mapping[str, JsonScalar]  # a mapping setting: an object of scalars


@dataclass(frozen=True)
class ResumableSettings:
    """The settings of the process that runs the federation (the coordinator's `CoordinatorConfig.resumable()`)
    that a resume may change, by name: fedcore only carries them (it may not import the coordinator), so that a
    resumed process can say which changed. state.json's "settings"; absent in older checkpoints."""

    values: Mapping[str, SettingValue] = field(default_factory=dict)

    def changed(self, given: ResumableSettings) -> list[tuple[str, SettingValue, SettingValue]]:
        """(name, saved value, given value) of each setting `given` changes; one saved before the setting
        existed (or before settings were saved) has none to compare."""
        saved = self.values
        return [(name, saved[name], value) for name, value in given.values.items() if name in saved and saved[name] != value]

    def as_json(self) -> dict[str, SettingValue]:
        return dict(self.values)

    @classmethod
    def from_json(cls, obj: object) -> ResumableSettings:
        """From state.json's "settings" (as parsed); ValueError naming the setting and its value where one is
        neither a JSON scalar nor an object of them."""
        if not isinstance(obj, dict):
            raise ValueError(f"is {obj!r}, expected a JSON object")
        for name, value in obj.items():
            scalars = value.values() if isinstance(value, dict) else [value]
            if not all(v is None or isinstance(v, (str, int, float, bool)) for v in scalars):
                raise ValueError(f"{name} is {value!r}, expected a JSON scalar or an object of them")
        return cls(dict(obj))


@dataclass(frozen=True)
class RunState:
    """What state.json commits beside the global model, each part read and checked by `load_state`."""

    completed_rounds: int
    config: RunConfig  # the run's settings (FederationConfig.record())
    contacted: tuple[str, ...]  # clients that hold a model (got the initial broadcast)
    ledger: Ledger  # the run's communication up to this checkpoint (a copy, never added to)
    global_file: str  # file name of the current global model
    tally: Tally = field(default_factory=Tally)  # absent in older checkpoints: all zero
    norms: NormHistory = field(default_factory=NormHistory)  # adaptive clipping's; absent in older checkpoints
    settings: ResumableSettings = field(default_factory=ResumableSettings)


def _versioned(stem: str, round_count: int) -> str:
    return f"{stem}-r{round_count:04d}.safetensors"


def _version(name: str, stem: str) -> int | None:
    """The round count of a file named as `_versioned(stem, n)`, else None."""
    m = re.fullmatch(rf"{re.escape(stem)}-r(\d{{4,}})\.safetensors", name)  # five digits from round 10,000
    return int(m.group(1)) if m else None


def _versions(folder: Path, stem: str) -> list[int]:
    return sorted(v for f in folder.iterdir() if (v := _version(f.name, stem)) is not None)


def global_versions(folder: str | Path) -> list[int]:
    """The round counts of the global models `folder` holds (global-rNNNN.safetensors), committed or not."""
    return _versions(Path(folder), "global")


def _prune(folder: Path, stem: str) -> None:
    """Keep the newest KEEP versions: the committed one survives a crash during the next write."""
    for v in _versions(folder, stem)[:-KEEP]:
        (folder / _versioned(stem, v)).unlink(missing_ok=True)


def save_run(directory: str | Path, global_state: dict[str, torch.Tensor], state: RunState) -> None:
    """Write the global model, then commit state.json; the previous checkpoint stays valid until then."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with naming(directory / state.global_file):
        save_file(directory / state.global_file, global_state, {"completed_rounds": str(state.completed_rounds)})
    run = {
        "completed_rounds": state.completed_rounds,
        "config": state.config.as_json(),
        "contacted": sorted(state.contacted),
        "ledger": state.ledger.as_json(),
        "global_file": state.global_file,
        "tally": state.tally.as_json(),
        "norms": state.norms.as_json(),
        "settings": state.settings.as_json(),
    }
    with naming(directory / STATE_FILE):
        atomic_write_json(directory / STATE_FILE, run)
    _prune(directory, "global")


def global_file_name(completed_rounds: int) -> str:
    return _versioned("global", completed_rounds)


def load_run(directory: str | Path) -> tuple[dict[str, torch.Tensor], RunState] | None:
    """The last committed checkpoint, or None when the directory holds none."""
    state = load_state(directory)
    if state is None:
        return None
    tensors, _ = load_file(Path(directory) / state.global_file)
    return tensors, state


def load_state(directory: str | Path) -> RunState | None:
    """The last committed checkpoint's state (state.json) without its model, or None when there is none;
    ValueError naming the file, the key and its value when the file is not a run's state."""
    where = Path(directory) / STATE_FILE
    try:
        raw = json.loads(where.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ValueError(f"{where}: not a run's state (JSON): {e}") from None
    if not isinstance(raw, dict) or not {"completed_rounds", "config", "contacted", "ledger", "global_file"} <= raw.keys():
        raise ValueError(f"{where}: not a run's state: expected a JSON object with completed_rounds, config, contacted, ledger, global_file")
    completed, contacted, global_file = raw["completed_rounds"], raw["contacted"], raw["global_file"]
    if not (isinstance(completed, int) and not isinstance(completed, bool) and completed >= 0):
        raise ValueError(f"{where}: completed_rounds is {completed!r}, expected an integer >= 0")
    if not (isinstance(contacted, list) and all(isinstance(c, str) for c in contacted)):
        raise ValueError(f"{where}: contacted is {contacted!r}, expected a list of client ids")
    if not isinstance(global_file, str):
        raise ValueError(f"{where}: global_file is {global_file!r}, expected a file name")
    return RunState(
        completed_rounds=completed,
        config=RunConfig.from_json(raw["config"], where),
        contacted=tuple(contacted),
        ledger=_section(raw, "ledger", Ledger.from_json, where),
        global_file=global_file,
        tally=_section(raw, "tally", Tally.from_json, where),
        norms=_section(raw, "norms", NormHistory.from_json, where),
        settings=_section(raw, "settings", ResumableSettings.from_json, where),
    )


Section = TypeVar("Section")


def _section(raw: Mapping[str, object], key: str, parse: Callable[[object], Section], where: Path) -> Section:
    """state.json's `key` (an empty object where an older checkpoint has none) read by `parse`; its ValueError
    names the file and the key."""
    try:
        return parse(raw.get(key, {}))
    except ValueError as e:
        raise ValueError(f"{where}: {key} {e}") from None


def run_in(directory: str | Path) -> str | None:
    """What of a run `directory` holds, in words ("5 rounds completed (state.json)", or the run's files
    when no state is committed), or None when it holds no state, global model, final model or round log."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    try:
        rounds = int(json.loads((directory / STATE_FILE).read_text())["completed_rounds"])
        return f"{rounds} round{'' if rounds == 1 else 's'} completed ({STATE_FILE})"
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STATE_FILE}, unreadable"
    found = [_versioned("global", v) for v in _versions(directory, "global")]
    found += [name for name in (FINAL_MODEL, ROUNDS_LOG) if (directory / name).is_file() and (directory / name).stat().st_size]
    return ", ".join(found) or None


def check_not_run_file(path: str | Path, flag: str) -> None:
    """ValueError, naming `flag`, when writing `path` would replace a file of a run: a state, global model,
    final model or round log in a folder that holds a run (`run_in`). Outputs of other commands (an export, a
    sample grid) go anywhere else, the run's folder included."""
    path = Path(path)
    name = path.name
    is_run_name = name in (STATE_FILE, ROUNDS_LOG, FINAL_MODEL) or _version(name, "global") is not None
    found = run_in(path.parent) if is_run_name else None
    if found:
        raise ValueError(f"{flag} {str(path)!r} would replace a file of the run in {str(path.parent)!r} ({found}); write it under another name")


def new_run_id() -> str:
    """A run's identity: 32 random hex digits."""
    return secrets.token_hex(16)


def load_run_id(directory: str | Path) -> str | None:
    """The run id saved in `directory` (RUN_FILE), None when there is none; ValueError when the file is not one."""
    file = Path(directory) / RUN_FILE
    if not file.exists():
        return None
    try:
        raw = json.loads(file.read_text())
    except ValueError as e:
        raise ValueError(f"{file}: not a run id (JSON): {e}") from None
    run_id = raw.get("run_id") if isinstance(raw, dict) else None
    if not isinstance(run_id, str) or not re.fullmatch(r"[0-9a-f]{1,64}", run_id):
        raise ValueError(f'{file}: not a run id: expected {{"run_id": up to 64 lowercase hex digits}}')
    return run_id


def save_run_id(directory: str | Path, run_id: str) -> None:
    atomic_write_json(Path(directory) / RUN_FILE, {"run_id": run_id})


def save_private(directory: str | Path, client: str, completed_rounds: int, tensors: dict[str, torch.Tensor]) -> None:
    """A client's private parts after `completed_rounds` rounds; older versions beyond KEEP are pruned."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(directory / _versioned(client, completed_rounds), tensors, {"completed_rounds": str(completed_rounds)})
    _prune(directory, client)


def load_private(directory: str | Path, client: str, completed_rounds: int | None = None) -> tuple[dict[str, torch.Tensor], int] | None:
    """The client's private parts at `completed_rounds` (or the newest), with the round count they belong to."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    versions = _versions(directory, client)
    if completed_rounds is not None:
        versions = [v for v in versions if v <= completed_rounds]
    if not versions:
        return None
    tensors, _ = load_file(directory / _versioned(client, versions[-1]))
    return tensors, versions[-1]


def personalised_state(global_state: dict[str, torch.Tensor], private_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A client's own model under udec/ulatdec: the shared parts of the global model, its private parts."""
    unknown = sorted(set(private_tensors) - set(global_state))
    if unknown:
        raise ValueError(f"private tensor {unknown[0]!r} is not part of the model")
    return {**global_state, **private_tensors}
