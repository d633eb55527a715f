"""Tests for `feddiff reproduce`: the CPU miniature end to end (results, docs, plots), resume, --only, rendering."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fedcore.experiments import report
from fedcore.experiments.reproduce import ALL_DATA, CENTRALISED, PROTOCOLS, Cell, parse_only, select_cells, with_overrides
from fedcore.experiments.results import CellResult, CurvePoint, ModelFd, ReferenceSet, load_results
from fedcore.federation.roundlog import ROUNDS_LOG
from feddiff.cli import main

CELLS = "full:iid,udec:iid"
K = 3  # clients of each federated cell: each of udec's is scored, so K models of 160 samples per curve point


def _reproduce(tmp: Path, *extra: str) -> int:
    argv = ["reproduce", "--protocol", "mini", "--out-dir", str(tmp / "run"), "--docs", str(tmp / "docs"), "--device", "cpu", "--threads", "1", *extra]
    return main(argv)


@pytest.fixture(scope="module")
def mini(tmp_path_factory, fashion_mnist_dir) -> Path:
    """The miniature with two strategies, run once through the CLI handler and shared by the tests below."""
    tmp = tmp_path_factory.mktemp("reproduce")
    assert _reproduce(tmp, "--only", CELLS, "--num-clients", str(K)) == 0
    return tmp


def _rows(tmp: Path) -> dict[str, CellResult]:
    return {r.cell: r for r in load_results(tmp / "run" / "results.jsonl")}


# --- the miniature end to end -----------------------------------------------------------------------------


def test_results_file_has_one_finite_line_per_cell(mini: Path) -> None:
    lines = (mini / "run" / "results.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]

    assert [r["cell"] for r in rows] == ["full:iid", "udec:iid"]
    for r in rows:
        assert math.isfinite(r["fd_mean"]) and r["fd_mean"] > 0
        assert math.isfinite(r["fd_std"])
        assert r["protocol"] == "mini" and r["rounds"] == 2 and r["clients"] == K
        assert r["device"].startswith("cpu: ") and r["sampler"] == "ddim-5" and r["samples"] == PROTOCOLS["mini"].samples
        assert r["seed"] == 0 and r["folder"] == r["cell"].replace(":", "-") and r["lr"] == PROTOCOLS["mini"].lr
        assert 0 < r["floor_fd"] < r["noise_fd"]
        assert r["feature_extractor"].startswith("fmnist-cnn:")
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
        assert r["wall_seconds"] > 0
    assert [json.dumps(CellResult.from_json(r).as_json()) for r in rows] == lines, "each line reads as its record and writes back byte for byte"


def test_parameters_follow_the_ledger(mini: Path) -> None:
    rows = _rows(mini)
    full, udec = rows["full:iid"], rows["udec:iid"]

    assert full.parameters_exchanged == full.full_fedavg_parameters and full.reduction_vs_full == 0.0
    assert udec.full_fedavg_parameters == full.full_fedavg_parameters
    assert udec.parameters_exchanged < full.parameters_exchanged
    assert udec.reduction_vs_full == pytest.approx(1 - udec.parameters_exchanged / udec.full_fedavg_parameters)


def test_udec_is_scored_per_client_and_full_once(mini: Path) -> None:
    rows = _rows(mini)
    full, udec = rows["full:iid"], rows["udec:iid"]
    fds = [m.fd for m in udec.fd_per_model]

    assert [m.model for m in full.fd_per_model] == ["global"] and full.fd_std == 0.0
    assert [m.model for m in udec.fd_per_model] == [f"client-{i}" for i in range(K)]
    assert sum(m.images for m in udec.fd_per_model) == udec.images
    assert len(set(fds)) == K  # personalised encoders and bottlenecks: K different models
    assert udec.fd_mean == pytest.approx(np.mean(fds)) and udec.fd_std == pytest.approx(np.std(fds))


def test_curve_has_a_point_per_evaluated_round(mini: Path) -> None:
    for r in _rows(mini).values():
        assert [p.round_number for p in r.curve] == [1, 2]  # mini evaluates every round
        assert tuple(p.cumulative_parameters for p in r.curve) == r.cumulative_parameters
        assert all(math.isfinite(p.fd_mean) and p.fd_per_model is None for p in r.curve)
    assert _rows(mini)["udec:iid"].curve[-1].fd_mean == pytest.approx(_rows(mini)["udec:iid"].fd_mean)


def test_docs_hold_the_table_and_two_valid_plots(mini: Path) -> None:
    md = (mini / "docs" / report.RESULTS_MD).read_text()

    assert "CPU miniature, not the paper protocol" in md
    copied = [json.loads(line) for line in (mini / "docs" / report.RESULTS_COPY).read_text().splitlines()]
    assert copied == [r.as_json() for r in load_results(mini / "run" / "results.jsonl")] and f"]({report.RESULTS_COPY})" in md
    assert report.GPU_COMMAND in md
    table_rows = [line for line in md.splitlines() if line.startswith("| full |") or line.startswith("| udec |")]
    assert len(table_rows) == 2 and all("| cpu: " in line for line in table_rows)
    assert "| real training images (160): the floor |" in md and "| uniform noise (160 images) |" in md
    for cell in ("full-iid", "udec-iid"):
        grid = f"{report.SAMPLES_DIR}/mini-{cell}.png"
        assert f"]({grid})" in md and (mini / "docs" / grid).stat().st_size > 1_000
    for name in (report.FD_PLOT, report.LOSS_PLOT):
        path = mini / "docs" / name
        assert f"]({name})" in md
        assert path.stat().st_size > 5_000
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width >= 300 and img.height >= 300
            assert len(img.getcolors(1 << 16) or range(1 << 16)) > 10  # not a blank canvas


def test_only_selected_cells_ran(mini: Path) -> None:
    folders = sorted(p.name for p in (mini / "run").iterdir() if p.is_dir())

    assert folders == ["full-iid", "reference", "udec-iid"]


# --- resume -------------------------------------------------------------------------------------------------


def test_second_invocation_trains_nothing(mini: Path) -> None:
    results = (mini / "run" / "results.jsonl").read_bytes()
    logs = {c: (mini / "run" / c / ROUNDS_LOG).read_bytes() for c in ("full-iid", "udec-iid")}

    started = time.perf_counter()
    assert _reproduce(mini, "--only", CELLS, "--num-clients", str(K)) == 0

    assert time.perf_counter() - started < 10
    assert (mini / "run" / "results.jsonl").read_bytes() == results
    assert {c: (mini / "run" / c / ROUNDS_LOG).read_bytes() for c in logs} == logs


def test_a_run_whose_results_lack_the_docs_measurements_leaves_the_docs_as_they_are(mini: Path, tmp_path: Path, capsys) -> None:
    """A fresh checkout's reproduction: its results file holds its own cells, the docs the committed table."""
    (tmp_path / "run").mkdir()
    shutil.copy(mini / "run" / "results.jsonl", tmp_path / "run" / "results.jsonl")
    (tmp_path / "docs").mkdir()
    committed = Path(__file__).resolve().parents[3] / "docs" / "results.jsonl"
    shutil.copy(committed, tmp_path / "docs" / "results.jsonl")
    (tmp_path / "docs" / "results.md").write_text("the committed table\n")

    assert _reproduce(tmp_path, "--only", CELLS, "--num-clients", str(K)) == 0

    out = capsys.readouterr().out
    assert "warning: the docs were not rendered: --docs " in out and "rendering would drop them" in out, out
    assert (tmp_path / "docs" / "results.jsonl").read_bytes() == committed.read_bytes()
    assert (tmp_path / "docs" / "results.md").read_text() == "the committed table\n"


def test_trained_cell_without_result_is_scored_from_its_checkpoint(mini: Path, tmp_path: Path) -> None:
    """A crash after the last round but before the result line: the rerun evaluates, it does not retrain."""
    for name in ("run/full-iid", "run/reference"):
        src, dst = mini / name, tmp_path / name
        dst.mkdir(parents=True)
        for f in src.rglob("*"):
            if f.is_file():
                (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                (dst / f.relative_to(src)).write_bytes(f.read_bytes())
    rounds_log = (tmp_path / "run" / "full-iid" / ROUNDS_LOG).read_bytes()

    assert _reproduce(tmp_path, "--only", "full:iid", "--num-clients", str(K)) == 0

    [row] = load_results(tmp_path / "run" / "results.jsonl")
    assert (tmp_path / "run" / "full-iid" / ROUNDS_LOG).read_bytes() == rounds_log
    assert row.fd_mean == _rows(mini)["full:iid"].fd_mean  # same weights, same sampling noise


# --- cells, options, rendering ------------------------------------------------------------------------------


def test_table_runs_centralised_first_then_split_by_split() -> None:
    cells = select_cells(["centralised", "full", "udec"], ["iid", "label"])

    assert [c.key for c in cells] == ["centralised:all", "full:iid", "udec:iid", "full:label", "udec:label"]
    assert cells[0].num_clients(5) == 1 and cells[1].num_clients(5) == 5


def test_only_accepts_repeats_comma_lists_and_bare_centralised() -> None:
    assert parse_only(["udec:iid,full:label", "centralised"]) == {"udec:iid", "full:label", f"{CENTRALISED}:{ALL_DATA}"}
    cells = select_cells(["centralised", "full", "udec"], ["iid", "label"], ["udec:label", "centralised"])
    assert cells == [Cell(CENTRALISED, ALL_DATA), Cell("udec", "label")]


@pytest.mark.parametrize("spec", ["udec", "udec:noniid", "fedprox:iid", "centralised:iid"])
def test_only_rejects_what_is_not_a_cell(spec: str) -> None:
    with pytest.raises(ValueError, match="is not a cell"):
        parse_only([spec])


def test_only_outside_the_selected_splits_is_an_error() -> None:
    with pytest.raises(ValueError, match="selects no cell"):
        select_cells(["udec"], ["iid"], ["udec:label"])


def test_protocols_keep_their_sizes() -> None:
    quick, paper = PROTOCOLS["quick"], PROTOCOLS["paper"]

    assert (quick.rounds, quick.epochs, quick.sampler, quick.steps, quick.samples, quick.eval_every) == (15, 1, "ddim", 100, 2000, 5)
    assert (paper.rounds, paper.epochs, paper.sampler, paper.eval_every) == (15, 5, "ddpm", 15)
    cpu = PROTOCOLS["cpu"]
    assert (cpu.model, cpu.rounds, cpu.epochs, cpu.batch_size, cpu.lr, cpu.max_images) == ("tiny", 5, 1, 32, 2e-3, 0)
    assert (cpu.sampler, cpu.steps, cpu.samples, cpu.reference_images) == ("ddim", 20, 1000, 0)  # >= 1,000 samples, >= 2,000 real
    assert with_overrides(quick, max_images=0, samples=None).samples == 2000
    with pytest.raises(ValueError, match="--samples"):
        with_overrides(quick, samples=0)


def _row(strategy: str, split: str, fd: float) -> CellResult:
    """A results line of the quick protocol as an older version wrote it (no folder, lr, floor or noise FD)."""
    return CellResult(
        protocol="quick", cell=f"{strategy}:{split}", folder=None, strategy=strategy, split=split,
        clients=1 if strategy == "centralised" else 5, model="paper-fmnist", rounds=15, epochs=1, batch_size=128, lr=None,
        max_images=0, images=60000, beta=0.5, split_seed=2023, seed=0, fd_mean=fd, fd_std=0.0,
        fd_per_model=(ModelFd("global", 60000, fd),), feature_extractor="fmnist-cnn:x", floor_fd=None, noise_fd=None,
        reference=ReferenceSet("fashion-mnist/test", 10000), samples=2000, sampler="ddim-100",
        parameters_exchanged=10**8, full_fedavg_parameters=2 * 10**8, reduction_vs_full=0.5,
        train_seconds=240.0, eval_seconds=60.0, wall_seconds=300.0, device="NVIDIA H100 80GB HBM3", date="2025-01-01", torch="2.5.1",
        losses=(0.1, 0.05), cumulative_parameters=(5 * 10**7, 10**8),
        curve=(CurvePoint(round_number=15, cumulative_parameters=10**8, samples=500, fd_mean=fd, fd_std=0.0, seconds=12.0),),
    )  # fmt: skip


def test_report_ratios_and_goal_against_centralised() -> None:
    rows = [_row("udec", "iid", 11.0), _row("centralised", "all", 10.0), _row("full", "iid", 10.5)]

    md = report.markdown(rows)

    assert md.index("| centralised |") < md.index("| full |") < md.index("| udec |")
    assert "| 1.10x |" in md and "| 1.05x |" in md and "| 1.00x |" in md
    assert "Measured on NVIDIA H100 80GB HBM3, 2025-01-01" in md and "CPU miniature" not in md
    assert "centralised FD: met by the 2 rows measured; not measured yet: usplit, ulatdec (" in md
    assert "not met (udec 1.20x); not measured yet: usplit, ulatdec" in report.goal_line([*rows[1:], _row("udec", "iid", 12.0)])


def test_the_goal_is_met_only_with_every_federated_row() -> None:
    rows = [_row("centralised", "all", 10.0), *(_row(s, "iid", 10.5) for s in ("full", "usplit", "ulatdec", "udec"))]

    assert "centralised FD: met (the paper" in report.goal_line(rows)
    assert "centralised FD: met by the 3 rows measured; not measured yet: usplit (" in report.goal_line([r for r in rows if r.strategy != "usplit"])


def test_no_verdict_when_the_centralised_model_is_no_better_than_noise() -> None:
    rows = [replace(_row("centralised", "all", 5133.0), noise_fd=4302.0), replace(_row("full", "iid", 5013.0), noise_fd=4302.0)]

    line = report.goal_line(rows)

    assert "centralised FD: not measurable here: the centralised model scores 5133.00, no better than uniform noise (4302.00)" in line
    assert " met" not in line


def test_render_without_results_says_so_and_draws_nothing(tmp_path: Path) -> None:
    written = report.render([], tmp_path, results_path="runs/reproduce/quick/results.jsonl")

    assert written == [tmp_path / report.RESULTS_MD]
    md = written[0].read_text()
    assert "No results yet" in md and report.GPU_COMMAND in md and report.CPU_COMMANDS in md and "![" not in md


def test_seeds_of_a_cell_make_one_row_with_their_spread() -> None:
    rows = [_row("centralised", "all", 10.0), replace(_row("centralised", "all", 12.0), seed=1), _row("udec", "iid", 11.5)]

    md = report.markdown(rows)

    [central] = [line for line in md.splitlines() if line.startswith("| centralised |")]
    assert "| 11.00 +- 1.00 |" in central and "| 0, 1 (+-9.1%) |" in central
    assert "| 1.05x |" in md  # udec 11.5 against the mean of both seeds, 11.0
    assert "run-to-run spread over seeds: centralised +-9.1%" in md


def test_notes_block_survives_a_new_rendering(tmp_path: Path) -> None:
    notes = f"{report.NOTES_BEGIN}\nOur udec row agrees with the paper.\n{report.NOTES_END}"
    (tmp_path / report.RESULTS_MD).write_text(f"# old rendering\n\n{notes}\n")

    report.render([_row("centralised", "all", 10.0)], tmp_path)

    md = (tmp_path / report.RESULTS_MD).read_text()
    assert "# old rendering" not in md and md.count("Our udec row agrees with the paper.") == 1
    assert md.index("| centralised |") < md.index(report.NOTES_BEGIN)


def test_skewed_rows_list_each_personalised_model_with_its_images() -> None:
    udec = replace(_row("udec", "quantity", 100.0), fd_per_model=(ModelFd("client-0", 46000, 20.0), ModelFd("client-1", 14, 180.0)))

    md = report.markdown([_row("centralised", "all", 10.0), udec])

    assert "### Skewed splits" in md
    assert "- udec, quantity: client-0 (46,000 images) 20.00; client-1 (14 images) 180.00" in md


def test_another_seed_is_its_own_line_and_folder(mini: Path) -> None:
    assert _reproduce(mini, "--only", "full:iid", "--num-clients", str(K), "--seed", "1") == 0

    rows = [r for r in load_results(mini / "run" / "results.jsonl") if r.cell == "full:iid"]
    assert [(r.seed, r.folder) for r in rows] == [(0, "full-iid"), (1, "full-iid-seed1")]
    assert rows[0].fd_mean != rows[1].fd_mean
    md = (mini / "docs" / report.RESULTS_MD).read_text()
    [full] = [line for line in md.splitlines() if line.startswith("| full |")]
    assert "| 0, 1 (+-" in full


def test_a_compressed_cell_is_its_own_line_and_folder_and_row_beside_its_plain_one(mini: Path) -> None:
    assert _reproduce(mini, "--only", "udec:iid", "--num-clients", str(K), "--compression", "topk:0.05+int8") == 0

    rows = _rows(mini)
    coded, plain = rows["udec:iid@topk:0.05+int8"], rows["udec:iid"]
    assert (coded.folder, coded.compression, plain.compression) == ("udec-iid-topk:0.05+int8", "topk:0.05+int8", "none")
    assert coded.parameters_exchanged == plain.parameters_exchanged  # the paper's count is the codec's too
    assert coded.payload_bytes is not None and plain.payload_bytes is not None and coded.payload_bytes < plain.payload_bytes
    md = (mini / "docs" / report.RESULTS_MD).read_text()
    [line] = [line for line in md.splitlines() if "`topk:0.05+int8`" in line]
    fewer = coded.full_fedavg_fp32_bytes / coded.payload_bytes  # type: ignore[operator]
    assert line.startswith(f"| mini | udec | iid | `topk:0.05+int8` | {coded.payload_bytes / 1e6:,.1f} MB | {fewer:.1f}x |")
    assert f"| {coded.fd_mean / plain.fd_mean:.2f}x |" in line
    assert [row for row in md.splitlines() if row.startswith("| udec | iid |")] != []  # the plain row stays in the table


def test_the_device_label_names_the_training_processes_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """With --devices the clients train in the pool's processes: the label names them, not the default device."""
    from fedcore.experiments import reproduce

    monkeypatch.setattr(reproduce, "_cpu_model", lambda: "Some CPU")
    monkeypatch.setattr(reproduce.torch.cuda, "get_device_name", lambda d: "NVIDIA H100")
    cpu = torch.device("cpu")

    assert reproduce.devices_label(cpu, None).startswith("cpu: Some CPU, ")
    assert reproduce.devices_label(cpu, SimpleNamespace(devices=("cpu", "cpu"), threads=1)) == "cpu x2: Some CPU, 1 thread each"  # type: ignore[arg-type]
    assert reproduce.devices_label(cpu, SimpleNamespace(devices=("cpu",) * 3, threads=4)) == "cpu x3: Some CPU, 4 threads each"  # type: ignore[arg-type]
    on_gpus = reproduce.devices_label(cpu, SimpleNamespace(devices=("cuda:0", "cuda:1"), threads=1))  # type: ignore[arg-type]
    assert on_gpus.startswith("NVIDIA H100 x2; evaluation on cpu: Some CPU, "), on_gpus


def test_a_rendering_on_its_own_reads_the_results_file_strictly_but_for_a_line_cut_short(tmp_path: Path) -> None:
    from fedcore.experiments.reproduce import read_results_to_render

    results = tmp_path / "results.jsonl"
    line = json.dumps(_row("centralised", "all", 10.0).as_json())
    results.write_text(f"{line}\n{line[:40]}")
    assert [r.strategy for r in read_results_to_render(results)] == ["centralised"]

    results.write_text(f"{line}\n{line[:40]}\n{line}\n")
    with pytest.raises(ValueError, match=rf"^{results}, line 2: not a results line \(not JSON: "):
        read_results_to_render(results)
