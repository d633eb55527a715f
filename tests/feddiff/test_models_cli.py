"""`feddiff export` and `feddiff sample` on the checkpoints of a real (tiny, one-round, udec) simulation."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedcore.federation.checkpoint import personalised_state
from fedcore.model.parts import Part
from fedcore.model.unet import build_model, layout_of, preset
from fedcore.payload.serialization import load_file
from feddiff.cli import main
from tests.checkpoints import saved_private, saved_run

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> Path:
    """`feddiff simulate`: 2 clients, udec, 1 round on 128 images; encoders and bottlenecks stay with the clients."""
    out = tmp_path_factory.mktemp("simulate") / "run"
    code = main(
        [
            "simulate",
            "--model",
            "tiny",
            "--strategy",
            "udec",
            "--num-clients",
            "2",
            "--rounds",
            "1",
            "--epochs",
            "1",
            "--max-images",
            "128",
            "--threads",
            "1",
            "--out-dir",
            str(out),
        ]
    )
    assert code == 0
    return out


@pytest.fixture
def worker_state(run_dir: Path, tmp_path: Path) -> Path:
    """client-1's private parts laid out as a worker daemon keeps them in its --state-dir."""
    state = tmp_path / "worker-state"
    state.mkdir()
    shutil.copy(run_dir / "clients" / "client-1-r0001.safetensors", state / "private-r0001.safetensors")
    (state / "identity.json").write_text(json.dumps({"worker_id": "hospital-1"}))
    return state


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_export_writes_the_global_model_and_its_config(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "export" / "global.safetensors"

    code = main(["export", "--checkpoint", str(run_dir), "--out", str(out)])

    assert code == 0
    tensors, metadata = load_file(out)
    expected, state = saved_run(run_dir)
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    config = json.loads(out.with_suffix(".json").read_text())
    assert json.loads(metadata["feddiff_export"]) == config and metadata["model"] == "tiny"
    sizes = layout_of(build_model("tiny")).sizes
    assert config["model"] == "tiny" and config["unet"] == json.loads(json.dumps(asdict(preset("tiny"))))
    assert (config["strategy"], config["completed_rounds"], config["kind"], config["worker"]) == ("udec", state.completed_rounds, "global", None)
    assert config["parts"] == {p.value: {"parameters": n, "from": "global"} for p, n in sizes.items()}
    assert config["parameters"] == sum(sizes.values())


def test_export_of_a_worker_state_dir_is_its_personalised_model(run_dir: Path, worker_state: Path, tmp_path: Path) -> None:
    out = tmp_path / "hospital-1.safetensors"

    code = main(["export", "--checkpoint", str(run_dir), "--worker-state", str(worker_state), "--out", str(out)])

    assert code == 0
    tensors, _ = load_file(out)
    global_state, _ = saved_run(run_dir)
    private, _ = saved_private(worker_state, "private")
    expected = personalised_state(global_state, private)
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    layout = layout_of(build_model("tiny"))
    encoder = layout.names([Part.ENCODER])
    assert any(not torch.equal(tensors[k], global_state[k]) for k in encoder), "the encoder must be the worker's own"
    assert all(torch.equal(tensors[k], global_state[k]) for k in layout.names([Part.DECODER]))
    config = json.loads(out.with_suffix(".json").read_text())
    assert (config["kind"], config["worker"], config["private_round"]) == ("personalised", "hospital-1", 1)
    assert {p: v["from"] for p, v in config["parts"].items()} == {"encoder": "worker", "bottleneck": "worker", "decoder": "global"}


def test_export_takes_the_private_parts_of_the_checkpoints_run(run_dir: Path, worker_state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A state dir reused for a later run keeps this run's parts in previous-runs/<run id>/: the export takes
    those, not the later run's in the state dir itself."""
    run_a, run_b = "a" * 32, "b" * 32
    checkpoints = tmp_path / "run-a"
    shutil.copytree(run_dir, checkpoints)
    (checkpoints / "run.json").write_text(json.dumps({"run_id": run_a}))
    (worker_state / "previous-runs" / run_a).mkdir(parents=True)
    (worker_state / "private-r0001.safetensors").rename(worker_state / "previous-runs" / run_a / "private-r0001.safetensors")
    shutil.copy(run_dir / "clients" / "client-0-r0001.safetensors", worker_state / "private-r0001.safetensors")  # run B's
    (worker_state / "run.json").write_text(json.dumps({"run_id": run_b}))
    out = tmp_path / "hospital-1.safetensors"

    assert main(["export", "--checkpoint", str(checkpoints), "--worker-state", str(worker_state), "--out", str(out)]) == 0

    tensors, _ = load_file(out)
    private, _ = saved_private(worker_state / "previous-runs" / run_a, "private")
    assert all(torch.equal(tensors[k], v) for k, v in private.items())

    shutil.rmtree(worker_state / "previous-runs")
    assert main(["export", "--checkpoint", str(checkpoints), "--worker-state", str(worker_state), "--out", str(tmp_path / "x.safetensors")]) != 0
    assert f"no private parts of run {run_a} (the checkpoint's); it holds those of run {run_b}" in capsys.readouterr().err


def test_export_takes_a_simulated_clients_private_parts_by_name(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "client-0.safetensors"

    code = main(["export", "--checkpoint", str(run_dir), "--worker-state", str(run_dir / "clients"), "--private-stem", "client-0", "--out", str(out)])

    assert code == 0
    global_state, _ = saved_run(run_dir)
    private, _ = saved_private(run_dir / "clients", "client-0")
    tensors, _ = load_file(out)
    expected = personalised_state(global_state, private)
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    assert json.loads(out.with_suffix(".json").read_text())["worker"] == "client-0"


@pytest.mark.parametrize(
    ("given", "line"),
    [
        ("{tmp}/empty", "--checkpoint {tmp}/empty: no final.safetensors, state.json or global-rNNNN.safetensors: not a run's folder"),
        (
            "{run}/clients/client-0-r0001.safetensors",
            "--checkpoint {run}/clients/client-0-r0001.safetensors: the private parts of one client, not a whole model; give the run's folder "
            "as --checkpoint and '{run}/clients' as --worker-state (with --private-stem client-0)",
        ),
        ("{tmp}/notes.safetensors", "--checkpoint {tmp}/notes.safetensors: not a safetensors file ("),
        ("{tmp}/model.pt", "--checkpoint {tmp}/model.pt: not a safetensors file ("),
    ],
    ids=["empty-folder", "private-parts", "text", "pickle"],
)
@pytest.mark.parametrize("command", ["sample", "export", "evaluate"])
def test_a_checkpoint_that_is_no_model_is_named_with_what_to_give(
    command: str, given: str, line: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.safetensors").write_text("my notes")
    (tmp_path / "model.pt").write_bytes(bytes(range(256)))
    fill = {"{tmp}": str(tmp_path), "{run}": str(run_dir)}
    for key, value in fill.items():
        given, line = given.replace(key, value), line.replace(key, value)
    out = {"sample": ["--out", str(tmp_path / "g.png")], "export": ["--out", str(tmp_path / "m.safetensors")], "evaluate": []}[command]

    code = main([command, "--checkpoint", given, "--model", "tiny", *out])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"feddiff {command}: error: {line}") and err.count("\n") == 1, err
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "m.safetensors").exists()


def test_export_refuses_a_state_dir_without_private_parts(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty-state"
    empty.mkdir()

    code = main(["export", "--checkpoint", str(run_dir), "--worker-state", str(empty), "--out", str(tmp_path / "x.safetensors")])

    assert code == 2
    err = capsys.readouterr().err
    assert f"--worker-state {str(empty)!r}: no private parts private-rNNNN.safetensors" in err and "--private-stem client-N" in err, err
    assert not (tmp_path / "x.safetensors").exists()


def test_sample_writes_the_same_grid_from_a_checkpoint_dir_and_from_its_export(run_dir: Path, tmp_path: Path) -> None:
    exported = tmp_path / "global.safetensors"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(exported)]) == 0
    common = ["--samples", "4", "--steps", "5", "--seed", "3", "--device", "cpu", "--threads", "1"]

    assert main(["sample", "--checkpoint", str(run_dir), *common, "--out", str(tmp_path / "dir.png")]) == 0
    assert main(["sample", "--checkpoint", str(exported), *common, "--out", str(tmp_path / "file.png")]) == 0

    from_dir, from_file = read_png(tmp_path / "dir.png"), read_png(tmp_path / "file.png")
    side = 2 * (2 * (28 + 2) + 2)  # 2x2 grid of 28-pixel images, 2-pixel padding, scaled by 2
    assert from_dir.shape == (side, side)
    assert np.array_equal(from_dir, from_file)
    assert from_dir.std() > 0


def test_sample_of_a_personalised_model_differs_from_the_global_one(run_dir: Path, worker_state: Path, tmp_path: Path) -> None:
    common = ["--checkpoint", str(run_dir), "--samples", "4", "--steps", "5", "--device", "cpu", "--threads", "1"]

    assert main(["sample", *common, "--out", str(tmp_path / "global.png")]) == 0
    assert main(["sample", *common, "--worker-state", str(worker_state), "--out", str(tmp_path / "own.png")]) == 0

    assert not np.array_equal(read_png(tmp_path / "global.png"), read_png(tmp_path / "own.png"))


def test_a_coordinators_final_model_is_preferred_to_the_last_round_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    from fedcore.payload.serialization import save_file

    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(run_dir, checkpoints)
    global_state, state = saved_run(run_dir)
    final = {k: v + 1 for k, v in global_state.items()}
    save_file(checkpoints / "final.safetensors", final, {"completed_rounds": str(state.completed_rounds)})

    assert main(["export", "--checkpoint", str(checkpoints), "--out", str(tmp_path / "m.safetensors")]) == 0

    tensors, _ = load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(tensors[k], final[k]) for k in final)


def test_sample_and_export_never_replace_a_file_unless_forced(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    precious = tmp_path / "precious.png"
    precious.write_text("my notes")
    exported = tmp_path / "g.safetensors"
    common = ["--checkpoint", str(run_dir), "--samples", "1", "--steps", "1", "--device", "cpu", "--threads", "1"]
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(exported)]) == 0
    capsys.readouterr()
    weights, config = exported.read_bytes(), exported.with_suffix(".json").read_text()
    exported.with_suffix(".json").write_text("edited")

    assert main(["sample", *common, "--out", str(precious)]) == 2
    assert (
        capsys.readouterr().err == f"feddiff sample: error: --out {str(precious)!r}: a file already there; pass --force to replace it, or give another --out\n"
    )
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(exported)]) == 2
    assert (
        capsys.readouterr().err == f"feddiff export: error: --out {str(exported)!r}: a file already there; pass --force to replace it, or give another --out\n"
    )
    assert precious.read_text() == "my notes" and exported.read_bytes() == weights and exported.with_suffix(".json").read_text() == "edited"

    assert main(["sample", *common, "--out", str(precious), "--force"]) == 0
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(exported), "--force"]) == 0
    assert read_png(precious).size > 0 and exported.with_suffix(".json").read_text() == config


@pytest.mark.parametrize("name", ["client-0-r0009.safetensors", "client-1-r0001.safetensors"])
def test_export_never_lands_among_a_runs_private_parts(name: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = {p.name: p.read_bytes() for p in (run / "clients").iterdir()}
    out = run / "clients" / name

    code = main(["export", "--checkpoint", str(run), "--out", str(out), "--force"])

    assert code == 2
    assert capsys.readouterr().err == (
        f"feddiff export: error: --out {str(out)!r}: {name.rsplit('-r', 1)[0]}-rNNNN.safetensors in the clients folder of the run in "
        f"{str(run)!r} (1 round completed (state.json)) names a client's own parts, which the run loads when it goes on; "
        "write the export under another name or elsewhere\n"
    )
    assert {p.name: p.read_bytes() for p in (run / "clients").iterdir()} == before


def test_export_never_lands_among_a_workers_private_parts(run_dir: Path, worker_state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = worker_state / "private-r0002.safetensors"

    code = main(["export", "--checkpoint", str(run_dir), "--out", str(out)])

    assert code == 2
    assert "in a worker's --state-dir (identity.json) names a client's own parts" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("command", "name"), [("export", "x.safetensors"), ("sample", "x.png")])
def test_an_out_under_a_file_names_the_file(command: str, name: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.log").write_text("mine")
    out = tmp_path / "notes.log" / name

    code = main([command, "--checkpoint", str(run_dir), "--out", str(out), "--samples", "1", "--steps", "1"][: 5 if command == "export" else None])

    assert code == 2
    assert capsys.readouterr().err == f"feddiff {command}: error: --out {str(out)!r}: {str(tmp_path / 'notes.log')!r} is a file, not a folder\n"
    assert (tmp_path / "notes.log").read_text() == "mine"


def test_export_takes_a_parts_like_name_anywhere_else(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "clients" / "client-0-r0009.safetensors"  # a folder named clients, but of no run

    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    assert out.is_file()


def test_sample_shows_its_progress_on_stderr_only(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from feddiff import progress

    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)
    argv = ["sample", "--checkpoint", str(run_dir), "--samples", "2", "--steps", "3", "--device", "cpu", "--threads", "1"]

    assert main([*argv, "--out", str(tmp_path / "a.png"), "--progress", "log"]) == 0
    shown = capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "b.png"), "--progress", "off"]) == 0
    silent = capsys.readouterr()

    assert [line.split(",")[0] for line in shown.err.splitlines()] == [f"sampling 2 images: {d}/3 steps ({p}%)" for d, p in ((1, 33), (2, 67), (3, 100))]
    assert shown.out.startswith("wrote ") and shown.out.count("\n") == 1
    assert silent.err == "" and silent.out.startswith("wrote ")


@pytest.mark.parametrize(
    ("out", "line"),
    [
        ("notes.txt", "--out '{tmp}/notes.txt' must end in .png"),
        ("", "--out = '': expected a string; the flag is given empty"),
        ("/", "--out '/': expected a FILE.png path; an empty name"),
        ("folder", "--out '{tmp}/folder' is a folder; expected a FILE.png path (e.g. '{tmp}/folder/grid.png')"),
    ],
)
def test_sample_refuses_an_out_that_is_no_png_file_in_one_line(out: str, line: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "folder").mkdir()
    given = str(tmp_path / out) if out not in ("", "/") else out

    code = main(["sample", "--checkpoint", str(run_dir), "--out", given, "--samples", "1", "--steps", "1", "--device", "cpu"])

    assert code == 2
    assert capsys.readouterr().err == f"feddiff sample: error: {line.format(tmp=tmp_path)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_steps_with_the_ddpm_sampler_is_refused(command: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path / "g.png")] if command == "sample" else []

    code = main([command, "--checkpoint", str(run_dir), *out, "--sampler", "ddpm", "--steps", "50", "--samples", "2", "--device", "cpu"])

    assert code == 2
    assert capsys.readouterr().err == (
        f"feddiff {command}: error: --steps 50 with --sampler ddpm: DDPM sampling always takes all 1000 steps; drop --steps, or use --sampler ddim\n"
    )
    assert not list(tmp_path.iterdir())
