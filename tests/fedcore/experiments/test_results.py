"""Tests for fedcore.experiments.results: results lines and FD curve points as typed records, byte for byte as
the files on disk hold them, older lines included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcore.experiments.results import CellResult, CurvePoint, append_result, load_curve, load_results

DOCS_RESULTS = Path(__file__).resolve().parents[3] / "docs" / "results.jsonl"

# A results line as the first version of `feddiff reproduce` wrote it: no folder, lr, floor or noise FD.
OLD_LINE = (
    '{"protocol": "mini", "cell": "udec:iid", "strategy": "udec", "split": "iid", "clients": 2, "model": "tiny", "rounds": 2, '
    '"epochs": 1, "batch_size": 32, "max_images": 300, "images": 300, "beta": 0.5, "split_seed": 2023, "seed": 0, '
    '"fd_mean": 812.5, "fd_std": 12.5, "fd_per_model": [{"model": "client-0", "images": 150, "fd": 800.0}, '
    '{"model": "client-1", "images": 150, "fd": 825.0}], "feature_extractor": "fmnist-cnn:8120e5f0dddc", '
    '"reference": {"dataset": "fashion-mnist/test[:1000]", "count": 1000}, "samples": 160, "sampler": "ddim-5", '
    '"parameters_exchanged": 431853, "full_fedavg_parameters": 1151608, "reduction_vs_full": 0.625, "train_seconds": 3.2, '
    '"eval_seconds": 4.1, "wall_seconds": 7.3, "device": "cpu: AMD EPYC, 2 threads", "date": "2025-11-02", "torch": "2.5.1", '
    '"losses": [0.25, 0.125], "cumulative_parameters": [287902, 431853], "curve": [{"round": 1, "cumulative_parameters": 287902, '
    '"samples": 160, "fd_mean": 900.0, "fd_std": 10.0, "seconds": 2.0}, {"round": 2, "cumulative_parameters": 431853, '
    '"samples": 160, "fd_mean": 812.5, "fd_std": 12.5, "seconds": 2.1}]}'
)
POINT_LINE = (
    '{"round": 1, "cumulative_parameters": 287902, "samples": 160, "fd_mean": 900.0, "fd_std": 10.0, '
    '"fd_per_model": {"client-0": 890.0, "client-1": 910.0}, "seconds": 2.0}'
)


def test_the_measured_results_read_as_records_and_write_back_byte_for_byte() -> None:
    lines = DOCS_RESULTS.read_text().splitlines()

    results = load_results(DOCS_RESULTS)

    assert len(results) == len(lines) > 0
    assert [json.dumps(r.as_json()) for r in results] == lines
    assert all(r.folder and r.lr and r.floor_fd and r.noise_fd for r in results)


def test_a_line_from_before_folders_and_baselines_reads_and_writes_back_unchanged() -> None:
    result = CellResult.from_json(json.loads(OLD_LINE))

    assert result.folder is None and result.lr is None and result.floor_fd is None and result.noise_fd is None
    assert [m.model for m in result.fd_per_model] == ["client-0", "client-1"] and result.curve[1].round_number == 2
    assert result.key == ("mini", "udec:iid", 2, 300, 0)
    assert json.dumps(result.as_json()) == OLD_LINE


def test_a_curve_point_keeps_its_per_model_fds_in_the_evaluations_file_only() -> None:
    point = CurvePoint.from_json(json.loads(POINT_LINE))

    assert json.dumps(point.as_json()) == POINT_LINE
    assert point.fd_per_model == {"client-0": 890.0, "client-1": 910.0}
    assert "fd_per_model" not in CellResult.from_json(json.loads(OLD_LINE)).curve[0].as_json()


def test_a_line_cut_by_a_crash_is_skipped_and_the_next_append_stays_whole(tmp_path: Path) -> None:
    path = tmp_path / "evaluations.jsonl"
    path.write_text(POINT_LINE + "\n" + POINT_LINE[:40])
    second = CurvePoint.from_json({**json.loads(POINT_LINE), "round": 2})

    assert load_curve(path) == [CurvePoint.from_json(json.loads(POINT_LINE))]
    append_result(path, second)

    assert [p.round_number for p in load_curve(path)] == [1, 2]
    assert path.read_text().splitlines()[-1] == json.dumps(second.as_json())


def test_a_complete_line_that_is_no_results_line_is_refused_naming_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(OLD_LINE + "\n" + json.dumps({**json.loads(OLD_LINE), "fd_per_model": [{"model": "global"}]}) + "\n")

    with pytest.raises(ValueError, match=r"results.jsonl, line 2: not a results line \(KeyError: 'images'\)"):
        load_results(path)
    assert load_results(tmp_path / "missing.jsonl") == []
