"""Tests for fedcore.federation.roundlog: what a resumed coordinator reads back from its round log."""

from __future__ import annotations

import json
from pathlib import Path

from fedcore.federation.roundlog import latest_in_log


def test_latest_in_log_reads_the_committed_round_and_the_latest_fds(tmp_path: Path) -> None:
    log = tmp_path / "rounds.jsonl"
    records = [
        {"round": 1, "participants": ["a"], "mean_loss": 0.5},
        {"round": 1, "kind": "evaluation", "fd": {"global": 40.0}},
        {"round": 2, "participants": ["a"], "mean_loss": 0.25},
        {"round": 2, "kind": "evaluation", "fd": {"global": 30.0, "a": 35.0}},
        {"round": 3, "participants": ["a"], "mean_loss": 0.125},  # after the checkpoint: not committed
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"round": 3, "kind": "eval')  # cut by a crash

    assert latest_in_log(log, 2) == (0.25, {"global": 30.0, "a": 35.0})
    assert latest_in_log(log, 1) == (0.5, {"global": 40.0})
    assert latest_in_log(tmp_path / "none.jsonl", 2) == (None, {})
