"""Every command's flags come from its typed config: a Literal setting is an argparse choice listed in --help,
and a bad value of any setting of model-info, strategies, split, simulate, reproduce, export, sample, evaluate,
health, status and certs ends the command with exit status 2 and one line naming the flag, the value and what
it takes, before anything runs. `feddiff --help` starts without torch or pydantic, `feddiff status` without
torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest

from coordinator.config import CoordinatorConfig
from fedcore import settings
from fedcore.model.training import SpeedConfig
from feddiff import cli
from feddiff.inspect_cli import ModelInfoSettings, SplitSettings, StrategiesSettings
from feddiff.models_cli import EvaluateConfig, ExportConfig, SampleConfig
from feddiff.reproduce_cli import ReproduceSettings
from feddiff.simulate_cli import SimulateConfig
from feddiff.system_cli import CertsConfig, HealthConfig, StatusConfig
from service import flags
from tests.parsers import subcommands
from worker.config import WorkerConfig

ROOT = Path(__file__).resolve().parents[2]


def _settings(*configs: type) -> dict[str, Any]:
    return {name: tp for cls in configs for name, tp, _ in flags.settings_of(cls, SKIPPED.get(cls, ()))}


SKIPPED: dict[type, tuple[str, ...]] = {ReproduceSettings: ("split",)}  # reproduce: each cell its split (--splits)


# The settings each command's flags set, by name: a new command fails the first test until it is listed here.
SETTINGS: dict[str, dict[str, Any]] = {
    "model-info": _settings(ModelInfoSettings),
    "strategies": _settings(StrategiesSettings),
    "split": _settings(SplitSettings),
    "simulate": _settings(SimulateConfig),
    "reproduce": _settings(ReproduceSettings),
    "coordinator": _settings(CoordinatorConfig),
    "worker": _settings(WorkerConfig, SpeedConfig),
    "certs": _settings(CertsConfig),
    "health": _settings(HealthConfig),
    "status": _settings(StatusConfig),
    "export": _settings(ExportConfig),
    "sample": _settings(SampleConfig),
    "evaluate": _settings(EvaluateConfig),
}
LITERALS = [(command, name, tp) for command, found in SETTINGS.items() for name, tp in found.items() if flags.choices(tp)]


def test_every_command_is_listed_here() -> None:
    assert set(SETTINGS) == set(cli.COMMANDS)
    assert {c for c, _, _ in LITERALS} == set(cli.COMMANDS) - {"certs", "health", "status"}


@pytest.mark.parametrize(("command", "name", "tp"), LITERALS, ids=[f"{c}--{n}" for c, n, _ in LITERALS])
def test_every_literal_setting_is_a_choice_listed_in_help(command: str, name: str, tp: Any) -> None:
    parser = subcommands(cli.build_parser())[command]
    flag = flags.flag((name,))
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    literal = tp if get_origin(tp) is Literal else next(a for a in get_args(tp) if get_origin(a) is Literal)

    assert list(action.choices or ()) == list(get_args(literal))
    assert f"{flag} {{{','.join(get_args(literal))}}}" in " ".join(parser.format_help().split())


def test_a_choice_is_checked_by_the_typed_config_in_its_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """argparse lists the values; the config refuses one outside them, in the words of every other setting."""
    assert cli.main(["simulate", "--strategy", "fedprox", "--out-dir", str(tmp_path / "run")]) == 2

    assert capsys.readouterr().err == "feddiff simulate: error: --strategy = 'fedprox': expected one of 'full', 'usplit', 'udec', 'ulatdec'\n"


# --- a bad value of every typed setting, refused at start in one line ----------------------------------------
TYPED = {
    "model-info": ModelInfoSettings,
    "strategies": StrategiesSettings,
    "split": SplitSettings,
    "simulate": SimulateConfig,
    "reproduce": ReproduceSettings,
    "export": ExportConfig,
    "sample": SampleConfig,
    "evaluate": EvaluateConfig,
    "health": HealthConfig,
    "status": StatusConfig,
    "certs": CertsConfig,
}
FREE = (str, bool, str | None, tuple[str, ...], settings.Folder)  # a free string (an output path, a comma list) or a switch


def _valued() -> list[tuple[str, str, Any]]:
    """(command, flag, type) of every setting of the typed commands whose flag takes a value that can be wrong."""
    return [(c, flags.flag((n,)), tp) for c, cls in TYPED.items() for n, tp, _ in flags.settings_of(cls, SKIPPED.get(cls, ())) if tp not in FREE]


VALUED = _valued()


def _base(command: str, tmp_path: Path) -> list[str]:
    """The flags a command needs besides the one under test, each writing (if it ran) inside tmp_path/out."""
    out = str(tmp_path / "out")
    return {
        "model-info": ["model-info"],
        "strategies": ["strategies"],
        "split": ["split"],
        "simulate": ["simulate", "--out-dir", out],
        "reproduce": ["reproduce", "--out-dir", out, "--docs", out],
        "export": ["export", "--checkpoint", str(tmp_path), "--out", out],
        "sample": ["sample", "--checkpoint", str(tmp_path), "--out", out],
        "evaluate": ["evaluate", "--checkpoint", str(tmp_path), "--grid", out],
        "health": ["health", "--address", "127.0.0.1:1"],
        "status": ["status", "--address", "127.0.0.1:1"],
        "certs": ["certs", "--out-dir", out],
    }[command]


@pytest.mark.parametrize(("command", "flag", "tp"), VALUED, ids=[f"{c}{f}" for c, f, _ in VALUED])
def test_every_typed_setting_refuses_a_bad_value_in_one_line(command: str, flag: str, tp: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = "nope" if flags.choices(tp) else "2.5x/"  # no choice; no number, device or existing path

    code = cli.main([*_base(command, tmp_path), flag, bad])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"feddiff {command}: error: {flag} = {bad!r}: expected ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["simulate", "--rounds", "0"], "--rounds = '0': expected an integer in 1..4294967295"),
        (["simulate", "--rounds", "99999999999999999999"], "--rounds = '99999999999999999999': expected an integer in 1..4294967295"),
        (["simulate", "--epochs", "10001"], "--epochs = '10001': expected an integer in 1..10000"),
        (["simulate", "--lr", "1"], "--lr = '1': expected a number in (0, 1)"),
        (["simulate", "--beta", "0"], "--beta = '0': expected a finite number > 0"),
        (["simulate", "--init-from", "{missing}"], "--init-from = '{missing}': expected a readable file or folder; no such file or folder"),
        (["reproduce", "--num-clients", "0"], "--num-clients = '0': expected an integer >= 1"),
        (["split", "--split-seed", "-1"], "--split-seed = '-1': expected an integer in 0..18446744073709551615"),
        (["split", "--max-images", "-1"], "--max-images = '-1': expected an integer >= 0"),
        (
            ["split", "--seed", "7"],
            "--seed 7 no longer names the split's seed (--seed seeds the run in the coordinator, simulate, reproduce and strategies): give --split-seed",
        ),
        (["reproduce", "--samples", "0"], "--samples = '0': expected an integer in 2..100000"),
        (["reproduce", "--eval-every", "0"], "--eval-every = '0': expected an integer >= 1"),
        (["reproduce", "--render", "--no-docs"], "--render with --no-docs renders nothing"),
        (["reproduce", "--splits", "iid,dirichlet"], "--splits = 'dirichlet': expected one of 'iid', 'quantity', 'label'"),
        (["reproduce", "--strategies", "udec, fedprox"], "--strategies = 'fedprox': expected one of 'centralised', 'full', 'usplit', 'udec', 'ulatdec'"),
        (["sample", "--checkpoint", "{tmp}", "--samples", "0"], "--samples = '0': expected an integer in 1..100000"),
        (["sample", "--checkpoint", "{tmp}", "--steps", "1001"], "--steps = '1001': expected an integer in 1..1000"),
        (["sample", "--checkpoint", "{tmp}", "--scale", "17"], "--scale = '17': expected an integer in 1..16"),
        (["sample", "--checkpoint", "{missing}"], "--checkpoint = '{missing}': expected a readable file or folder; no such file or folder"),
        (["evaluate", "--checkpoint", "{tmp}", "--samples", "1"], "--samples = '1': expected an integer in 2..100000"),
        (["evaluate", "--checkpoint", "{tmp}", "--sampler", "euler"], "--sampler = 'euler': expected one of 'ddpm', 'ddim'"),
        (
            ["evaluate", "--checkpoint", "{tmp}", "--reference-dir", "{missing}"],
            "--reference-dir = '{missing}': expected a readable folder; no such file or folder",
        ),
        (["export", "--checkpoint", "{tmp}", "--out", "m.safetensors", "--format", "onnx"], "--format = 'onnx': expected one of 'feddiff', 'diffusers'"),
    ],
)
def test_a_value_outside_its_range_is_named_with_the_range(argv: list[str], line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = {"{tmp}": str(tmp_path), "{missing}": str(tmp_path / "missing")}
    argv, line = [paths.get(a, a) for a in argv], line.replace("{missing}", paths["{missing}"])

    assert cli.main(argv) == 2

    assert capsys.readouterr().err == f"feddiff {argv[0]}: error: {line}\n"


@pytest.mark.parametrize(
    ("argv", "name", "content", "line"),
    [
        (["simulate", "--model", "tiny", "--init-from"], "junk.safetensors", b"\x03\x00", "--init-from {file}: not a safetensors file"),
        (
            ["simulate", "--model", "tiny", "--init-from"], "model.pt", b"weights",
            "--init-from {file}: expected a diffusers UNet or pipeline folder, or a .safetensors file",
        ),
        (["reproduce", "--protocol", "mini", "--inception-weights"], "notes.pth", b"my notes", "--inception-weights: '{file}' is not a torch state dict of tensors"),
    ],
)  # fmt: skip
def test_a_model_file_that_is_none_is_named_with_its_flag_and_nothing_is_created(
    argv: list[str], name: str, content: bytes, line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    given = tmp_path / name
    given.write_bytes(content)
    out = tmp_path / "run"

    code = cli.main([*argv, str(given), "--out-dir", str(out)])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"feddiff {argv[0]}: error: {line.format(file=given)}") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["simulate", "--out-dir", "{file}"], "--out-dir '{file}' is a file, not a folder"),
        (["simulate", "--out-dir", "{file}/run"], "--out-dir '{file}/run' cannot be a folder (its parent '{file}' is a file)"),
        (["reproduce", "--protocol", "mini", "--out-dir", "{file}"], "--out-dir '{file}' is a file, not a folder"),
        (
            ["simulate", "--max-images", "3", "--num-clients", "5", "--out-dir", "{run}"],
            "3 images cannot give 5 clients at least 10 images each (needs 50): lower the number of clients (--num-clients)",
        ),
    ],
)
def test_a_run_folder_that_cannot_be_one_or_a_refused_split_creates_nothing(
    argv: list[str], line: str, tmp_path: Path, fashion_mnist_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    given = tmp_path / "notes.txt"
    given.write_text("my notes")
    paths = {"{file}": str(given), "{run}": str(tmp_path / "run")}

    def fill(text: str) -> str:
        for name, path in paths.items():
            text = text.replace(name, path)
        return text

    code = cli.main([fill(a) for a in argv])

    assert code == 2
    assert capsys.readouterr().err == f"feddiff {argv[0]}: error: {fill(line)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and given.read_text() == "my notes"


def test_help_starts_without_torch_or_pydantic_and_status_without_torch() -> None:
    script = (
        "import sys\n"
        "from feddiff.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "loaded = [m for m in ('torch', 'pydantic') if m in sys.modules]\n"
        "code = main(['status', '--address', '127.0.0.1:1', '--timeout', '0.01'])\n"
        "print(loaded, [m for m in ('torch',) if m in sys.modules], code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False
    )

    assert result.stdout.splitlines()[-1] == "[] [] 1", result.stderr
