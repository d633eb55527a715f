"""Tests for fedcore.federation.roundlog: the round log's lines as typed records, and what a resumed coordinator
reads back from its round log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcore.atomic import MALFORMED
from fedcore.federation.roundlog import EvaluationRecord, RoundRecord, format_evaluation, format_round, latest_in_log, read_round_log, truncate_log
from fedcore.model.parts import Part


def _parts(n: int) -> str:
    return f'{{"encoder": 0, "bottleneck": 0, "decoder": {n}}}'


def _ledger_fields(down: int, up: int) -> str:
    """A round line's ledger keys as the log writes them: the decoder only, 4 bytes a parameter plus a header."""
    parts = _parts
    return (
        f'"parameters": {{"down": {parts(down)}, "up": {parts(up)}}}, "bytes": {{"down": {parts(4 * down + 120)}, "up": {parts(4 * up + 120)}}}, '
        f'"parameters_total": {down + up}, "full_fedavg_parameters": {6 * (down + up)}'
    )


def round_line(number: int, mean_loss: float, *, bounds: bool = True) -> str:
    """A round's line byte for byte as the coordinator and the simulation write it; `bounds=False`: as logs
    written before FedAvg weights were bounded and updates clipped hold it (no "weights" key, no "clipped")."""
    bounded = '"weights": {"client-0": 80, "client-1": 40}, "clipped": {"client-1": {"decoder": 0.5}}, ' if bounds else ""
    return (
        f'{{"round": {number}, "participants": ["client-0", "client-1"], "planned": ["client-0", "client-1", "client-2"], '
        f'"mean_loss": {mean_loss}, "client_loss": {{"client-0": {mean_loss}, "client-1": {mean_loss}}}, {bounded}'
        f"{_ledger_fields(2000, 1000)}, "
        f'"cumulative_parameters": {3000 * number}, "cumulative_full_fedavg_parameters": {18000 * number}, '
        f'"reduction_so_far": 0.8333333333333334, "seconds": 1.25}}'
    )


def evaluation_line(number: int, fds: dict[str, float]) -> str:
    """An evaluation's line byte for byte as the coordinator writes it (`EvalPhase.summary`)."""
    mean = sum(fds.values()) / len(fds)
    return (
        f'{{"round": {number}, "kind": "evaluation", "models": "personalised", "fd": {json.dumps(fds)}, "fd_mean": {mean}, '
        f'"fd_std": 2.5, "extractor": "fmnist-cnn:8120e5f0dddc", "evaluated": {len(fds)}, "asked": 3}}'
    )


def test_a_round_line_reads_as_its_record_and_writes_back_byte_for_byte() -> None:
    line = round_line(2, 0.125)

    record = RoundRecord.from_json(json.loads(line))

    assert json.dumps(record.as_json()) == line
    assert record.round_number == 2 and record.participants == ("client-0", "client-1") and len(record.planned) == 3
    assert record.fedavg_weights == {"client-0": 80, "client-1": 40} and record.clipped == {"client-1": {Part.DECODER: 0.5}}
    assert record.ledger.traffic.total == 3000 and record.ledger.bytes_down[Part.DECODER] == 8120
    assert format_round(record) == "round 2: 2/3 clients, down 0.01 MB, up 0.00 MB, reduction so far 83.3%, loss 0.1250, 1.2s"


def test_a_round_line_from_before_the_bounds_still_reads() -> None:
    record = RoundRecord.from_json(json.loads(round_line(1, 0.5, bounds=False)))

    assert record.fedavg_weights == {} and record.clipped == {} and record.mean_loss == 0.5


def test_an_evaluation_line_reads_as_its_record_and_writes_back_byte_for_byte() -> None:
    line = evaluation_line(3, {"client-0": 30.0, "client-1": 35.0})

    record = EvaluationRecord.from_json(json.loads(line))

    assert json.dumps(record.as_json()) == line
    assert record.round_number == 3 and record.fd_by_model == {"client-0": 30.0, "client-1": 35.0} and record.models == "personalised"
    assert format_evaluation(record) == "evaluation after round 3: FD 32.50 +- 2.50 over 2 of 3 models (fmnist-cnn:8120e5f0dddc)"


@pytest.mark.parametrize(
    ("change", "named"),
    [({"models": "ensemble"}, "models is 'ensemble'"), ({"fd": None}, "'NoneType' object has no attribute 'items'"), ({"kind": "round"}, "kind is 'round'")],
)
def test_an_evaluation_line_that_does_not_fit_is_refused_naming_what(change: dict[str, object], named: str) -> None:
    obj = {**json.loads(evaluation_line(1, {"global": 40.0})), **change}

    with pytest.raises(MALFORMED, match=named):
        EvaluationRecord.from_json(obj)


def _log(tmp_path: Path) -> Path:
    log = tmp_path / "rounds.jsonl"
    lines = [
        round_line(1, 0.5, bounds=False),
        evaluation_line(1, {"global": 40.0}),
        round_line(2, 0.25),
        evaluation_line(2, {"global": 30.0, "a": 35.0}),
        round_line(3, 0.125),  # after the checkpoint: not committed
    ]
    log.write_text("".join(line + "\n" for line in lines) + '{"round": 3, "kind": "eval')  # cut by a crash
    return log


def test_latest_in_log_reads_the_committed_round_and_the_latest_fds(tmp_path: Path) -> None:
    log = _log(tmp_path)

    assert latest_in_log(log, 2) == (0.25, {"global": 30.0, "a": 35.0})
    assert latest_in_log(log, 1) == (0.5, {"global": 40.0})
    assert latest_in_log(tmp_path / "none.jsonl", 2) == (None, {})


def test_truncate_log_keeps_the_committed_lines_byte_for_byte_and_drops_a_cut_one(tmp_path: Path) -> None:
    log = _log(tmp_path)
    committed = log.read_text().splitlines()[:4]

    truncate_log(log, 2)

    assert log.read_text() == "".join(line + "\n" for line in committed)
    assert [type(r).__name__ for r in read_round_log(log)] == ["RoundRecord", "EvaluationRecord"] * 2


def test_a_complete_line_that_is_no_record_is_refused_naming_the_file_and_line(tmp_path: Path) -> None:
    log = tmp_path / "rounds.jsonl"
    log.write_text(round_line(1, 0.5) + "\n" + '{"round": 2, "participants": ["a"]}\n')

    with pytest.raises(ValueError, match=r"rounds.jsonl, line 2: not a round log record \(KeyError: 'planned'\)"):
        read_round_log(log)


def test_a_round_line_with_its_bytes_shows_them_against_plain_fedavg_in_float32() -> None:
    obj = json.loads(round_line(2, 0.125))
    obj["cumulative_payload_bytes"] = 1200  # plain FedAvg float32: 4 x the cumulative plain FedAvg parameters

    record = RoundRecord.from_json(obj)

    assert record.as_json() == obj
    assert record.bytes_vs_fedavg_fp32 == 4 * record.cumulative_full_fedavg_parameters / 1200
    assert f"83.3%, {record.bytes_vs_fedavg_fp32:.1f}x fewer bytes than plain FedAvg float32, loss" in format_round(record)
