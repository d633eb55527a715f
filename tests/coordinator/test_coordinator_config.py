"""The coordinator's settings from YAML and flags: every value converted to its setting's type or refused at
start in one line that names the key, the value and what was expected."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import pytest
import yaml

from coordinator.config import CoordinatorConfig
from fedcore import settings
from fedcore.errors import SettingsError
from feddiff.cli import main
from tests.parsers import coordinator_config

TYPES = get_type_hints(CoordinatorConfig, include_extras=True)
SETTINGS = [f.name for f in fields(CoordinatorConfig)]


def _base(tp: Any) -> Any:
    return get_args(tp)[0] if get_args(tp) and get_origin(tp) is not Literal else tp


def _wrong_value(name: str) -> object:
    """A value of the wrong type for the setting, as a YAML file could hold it."""
    tp = TYPES[name]
    if tp is bool:
        return "perhaps"
    if tp is str or (get_origin(tp) is Annotated and get_args(tp)[0] is str):  # a path, an address: no number
        return 12
    if get_origin(tp) is Literal:
        return "nope"
    return "ten"


def _yaml(tmp_path: Path, values: dict[str, object]) -> Path:
    path = tmp_path / "coordinator.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_yaml_1_1_strings_become_the_numbers_they_spell(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.yaml"
    path.write_text("lr: 1e-4\nmin_workers: '1'\nround_deadline: '30'\nquorum: 1\nresume: 'true'\n")
    assert yaml.safe_load(path.read_text())["lr"] == "1e-4"  # what YAML 1.1 makes of it

    cfg = coordinator_config(path, {})

    assert (cfg.lr, cfg.min_workers, cfg.round_deadline, cfg.quorum, cfg.resume) == (1e-4, 1, 30.0, 1.0, True)
    assert isinstance(cfg.lr, float) and isinstance(cfg.min_workers, int)
    assert cfg.federation.train.lr == 1e-4


@pytest.mark.parametrize("name", SETTINGS)
def test_every_setting_refuses_a_value_of_the_wrong_type_in_the_file(name: str, tmp_path: Path) -> None:
    bad = _wrong_value(name)
    path = _yaml(tmp_path, {name: bad})

    with pytest.raises(SettingsError) as e:
        coordinator_config(path, {})

    assert str(e.value).startswith(f"{name} (in {path}) = {bad!r}: expected {settings.expected(TYPES[name])}")


@pytest.mark.parametrize("name", [n for n in SETTINGS if TYPES[n] not in (bool, str)])
def test_every_flag_is_converted_from_its_string_and_refused_by_name(name: str) -> None:
    default = getattr(CoordinatorConfig(), name)
    if default != "":  # a flag given empty is refused (below)
        assert getattr(coordinator_config(None, {name: str(default)}), name) == default

    with pytest.raises(SettingsError, match=f"^--{name.replace('_', '-')} = {_wrong_value(name)!r}: expected "):
        coordinator_config(None, {name: _wrong_value(name)})


def test_flags_override_the_file_and_each_is_named_by_where_it_came_from(tmp_path: Path) -> None:
    path = _yaml(tmp_path, {"rounds": 2.5, "epochs": 3})

    with pytest.raises(SettingsError) as e:
        coordinator_config(path, {"batch_size": "0", "epochs": "2"})

    assert str(e.value) == (
        f"rounds (in {path}) = 2.5: expected an integer in 1..{2**32 - 1}; --batch-size = '0': expected an integer in 1..{settings.MAX_BATCH}"
    )
    assert coordinator_config(path, {"rounds": "4", "epochs": "2"}).epochs == 2


def test_an_unknown_key_and_a_malformed_address_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^unknown setting learning_rate \(in .*\) \(known: strategy, model, "):
        coordinator_config(_yaml(tmp_path, {"learning_rate": 0.1}), {})
    with pytest.raises(SettingsError, match=r"^--listen = 'localhost': expected HOST:PORT with a port in 0\.\.65535 \(0: a free one\)$"):
        coordinator_config(None, {"listen": "localhost"})


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--lr", "1e4"], "--lr = '1e4': expected a number in (0, 1)"),
        (["--epochs", "0"], f"--epochs = '0': expected an integer in 1..{settings.MAX_EPOCHS}"),
        (["--min-workers", "2.5"], "--min-workers = '2.5': expected an integer >= 1"),
        (["--metrics-port", "70000"], "--metrics-port = '70000': expected an integer in -1..65535"),
        (["--strategy", "fedavg"], "--strategy = 'fedavg': expected one of 'full', 'usplit', 'udec', 'ulatdec'"),
    ],
)
def test_the_coordinator_command_refuses_at_start_with_one_line_and_status_2(argv: list[str], line: str, tmp_path: Path, capsys) -> None:
    code = main(["coordinator", "--insecure", "--checkpoint-dir", str(tmp_path / "ckpt"), *argv])

    assert code == 2
    assert capsys.readouterr().err == f"feddiff coordinator: error: {line}\n"
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("lr: [1, 2\n", "not valid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'"),
        ("lr: !!python/object:os.system x\n", "not valid YAML at line 1, column 5: could not determine a constructor"),
        ("- 1\n", "expected a mapping of settings, got list"),
    ],
)
def test_a_config_file_that_is_not_a_yaml_mapping_is_refused_in_one_line(text: str, line: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)

    assert main(["coordinator", "--insecure", "--checkpoint-dir", str(tmp_path / "ckpt"), "--config", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"feddiff coordinator: error: --config {path}: {line}")
    assert main(["coordinator", "--insecure", "--config", str(tmp_path)]) == 2
    assert f"--config {tmp_path}: cannot read it (Is a directory)" in capsys.readouterr().err


def test_worker_sizes_come_from_a_yaml_mapping_or_a_flag_and_bound_the_weights(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.yaml"
    path.write_text("worker_sizes:\n  hospital-1: 6000\n  2: '4000'\nmax_weight_share: 1\nclip_norm: '0.5'\n")

    from_file = coordinator_config(path, {})
    from_flag = coordinator_config(None, {"worker_sizes": "hospital-1=6000, 2=4000", "max_weight_share": "1", "clip_norm": "0.5"})

    assert from_file.worker_sizes == from_flag.worker_sizes == {"hospital-1": 6000, "2": 4000}
    assert from_file.robust == from_flag.robust
    assert from_file.robust.bound_fedavg_weights({"hospital-1": 10**9, "2": 10}).fedavg_weights == {"hospital-1": 6000, "2": 10}
    assert (from_file.robust.clip_norm, CoordinatorConfig().robust.max_weight_share) == (0.5, 0.5)


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            {"worker_sizes": "hospital-1=0"},
            "--worker-sizes = 'hospital-1=0': expected a mapping of worker id to images in 1..4294967295 (a flag: ID=N,ID=N); worker 'hospital-1': 0 images",
        ),
        ({"worker_sizes": "hospital-1=4294967296"}, "--worker-sizes = 'hospital-1=4294967296': expected a mapping"),
        (
            {"worker_sizes": "../x=5,y=5"},
            "--worker-sizes = '../x=5,y=5': expected a mapping of worker id to images in 1..4294967295 (a flag: ID=N,ID=N); '../x' is no worker id",
        ),
        ({"worker_sizes": "hospital-1=5"}, "--min-workers 2 (the default) is more than the 1 workers in --worker-sizes: no round could start"),
        ({"clip_multiplier": "nan"}, "--clip-multiplier = 'nan': expected a finite number >= 0"),
        ({"max_delta_value": "-1"}, "--max-delta-value = '-1': expected a finite number >= 0"),
        ({"departed_retention": "inf"}, "--departed-retention = 'inf': expected 0 s up to 604800 s (a week)"),
        ({"departed_retention": "1e12"}, "--departed-retention = '1e12': expected 0 s up to 604800 s (a week)"),
        ({"departed_retention": "-1"}, "--departed-retention = '-1': expected 0 s up to 604800 s (a week)"),
    ],
)
def test_the_hostile_worker_settings_are_refused_out_of_range(overrides: dict[str, str], line: str) -> None:
    with pytest.raises(SettingsError) as e:
        coordinator_config(None, overrides)

    assert str(e.value).startswith(line), str(e.value)


def test_compression_comes_from_the_file_or_a_flag_and_an_unknown_codec_is_refused_by_name(tmp_path: Path) -> None:
    path = _yaml(tmp_path, {"compression": "topk:0.05+int8", "compression_block": 32})

    assert coordinator_config(path, {}).federation.compression.name == "topk:0.05+int8:32"
    assert coordinator_config(path, {"compression": "int4", "compression_block": "0"}).federation.compression.name == "int4"
    with pytest.raises(SettingsError, match=r"^--compression = 'int3': expected a codec name"):
        coordinator_config(path, {"compression": "int3"})
    with pytest.raises(SettingsError, match="compression_block 32 is given, but codec 'bf16' has no int8 or int4 blocks"):
        coordinator_config(path, {"compression": "bf16"})


@pytest.mark.parametrize("name", ["int8:64", "topk:0.05+int8:64", "int4:128"])
def test_a_codec_name_whose_block_differs_from_the_block_setting_is_refused_even_at_the_default(name: str) -> None:
    """The name is checked as given: "int8:64" names the default block, and is still not "int8:32"."""
    with pytest.raises(SettingsError, match=f"codec {re.escape(repr(name))} names block size .*, compression_block 32: give one"):
        coordinator_config(None, {"compression": name, "compression_block": "32", "insecure": "true"})


@pytest.mark.parametrize(
    ("name", "block", "canonical"),
    [("int8:64", 0, "int8"), ("int8", 64, "int8"), ("int8", 32, "int8:32"), ("int8:32", 32, "int8:32"), ("topk:0.05+int4", 16, "topk:0.05+int4:16")],
)
def test_the_config_keeps_the_codec_in_one_spelling_with_its_block_in_the_name(name: str, block: int, canonical: str) -> None:
    cfg = coordinator_config(None, {"compression": name, "compression_block": str(block), "insecure": "true"})

    assert (cfg.compression, cfg.compression_block, cfg.federation.compression.name) == (canonical, 0, canonical)


def test_a_resume_takes_the_settings_that_define_the_run_from_its_checkpoint_when_not_given(tmp_path: Path) -> None:
    """`--resume` alone resumes a run made with other settings than the defaults: they come from its checkpoint
    (a start without them compared the defaults with it and was refused: "model (saved 'tiny', given
    'paper-fmnist')"), and a finished run is not extended to the default 15 rounds. Settings given still win."""
    from coordinator.server import build_federation, with_saved_settings
    from fedcore.federation.engine import Federation, FederationConfig

    made = {"strategy": "full", "model": "tiny", "rounds": 2, "seed": 7, "epochs": 1, "batch_size": 8, "lr": 1e-3, "loss": "mse", "compression": "int8"}
    Federation(FederationConfig.from_settings(clients_per_round=0, **made)).save(tmp_path)  # type: ignore[arg-type]

    resumed = with_saved_settings(settings.build(CoordinatorConfig, {"resume": True, "checkpoint_dir": str(tmp_path)}))
    extended = with_saved_settings(settings.build(CoordinatorConfig, {"resume": True, "checkpoint_dir": str(tmp_path), "rounds": 3}))
    fresh = with_saved_settings(settings.build(CoordinatorConfig, {"checkpoint_dir": str(tmp_path / "new")}))

    assert {k: getattr(resumed, k) for k in made} == made
    assert build_federation(resumed).config == resumed.federation  # accepted: nothing differs
    assert (extended.rounds, extended.model) == (3, "tiny")
    assert fresh.model == "paper-fmnist"


def test_a_departed_retention_of_0_forgets_a_worker_as_it_departs_and_a_week_is_the_longest() -> None:
    assert coordinator_config(None, {"departed_retention": "0"}).departed_retention == 0.0
    assert coordinator_config(None, {"departed_retention": "604800"}).departed_retention == 604800.0


@pytest.mark.parametrize("name", [n for n in SETTINGS if getattr(CoordinatorConfig(), n) == ""])
def test_a_path_or_name_flag_given_empty_is_refused_not_taken_for_not_given(name: str) -> None:
    with pytest.raises(SettingsError) as e:
        coordinator_config(None, {name: ""})

    assert str(e.value) == f"--{name.replace('_', '-')} = '': expected {settings.expected(TYPES[name])}; the flag is given empty"


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--resume", "--resume-or-start"], "--resume and --resume-or-start: give one"),
        (
            ["--worker-sizes", "a=5,b=5,c=5", "--clients-per-round", "4"],
            "--clients-per-round 4 is more than the 3 workers in --worker-sizes: no round could sample that many",
        ),
        (["--config", ""], "--config = '': expected a YAML file of settings; the flag is given empty"),
    ],
)
def test_settings_that_cannot_go_together_are_refused_at_start(argv: list[str], line: str, tmp_path: Path, capsys) -> None:
    code = main(["coordinator", "--insecure", "--checkpoint-dir", str(tmp_path / "ckpt"), *argv])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"feddiff coordinator: error: {line}"), err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    ("files", "line"),
    [
        ({"tokens": "[1]"}, "--tokens-file {tokens}: expected a mapping of worker id to a non-empty token"),
        ({"tokens": "a: x\n", "status": " \n"}, "--status-token-file {status}: the file is empty"),
    ],
)
def test_a_bad_tokens_file_is_refused_before_the_run_is_named_or_its_folder_made(files: dict[str, str], line: str, tmp_path: Path, capsys) -> None:
    paths = {name: tmp_path / name for name in files}
    for name, text in files.items():
        paths[name].write_text(text)
    flags = ["--tokens-file", str(paths["tokens"])] + (["--status-token-file", str(paths["status"])] if "status" in paths else [])
    ckpt = tmp_path / "ckpt"

    code = main(["coordinator", "--insecure", "--listen", "127.0.0.1:0", "--metrics-port", "-1", "--checkpoint-dir", str(ckpt), *flags])

    err = capsys.readouterr().err
    assert code == 2
    assert err == f"feddiff coordinator: error: {line.format(**{k: str(v) for k, v in paths.items()})}\n"
    assert not ckpt.exists()
