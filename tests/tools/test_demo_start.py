"""`make demo` and `make smoke` when a process does not start in time: one message naming the process, its
wait and its log, exit status 1, no traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tools import demo, smoke


@pytest.mark.parametrize(("tool", "prefix"), [(demo, "feddiff demo: "), (smoke, "smoke: FAILED: ")], ids=["demo", "smoke"])
def test_a_coordinator_not_ready_in_time_is_named_with_its_log(tool, prefix: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(tool, "READY_SECONDS", 0.2)  # no coordinator imports torch this fast
    monkeypatch.setattr(sys, "argv", [tool.__name__, "--workdir", str(tmp_path / "run")])

    code = tool.main()

    err = capsys.readouterr().err
    log = tmp_path / "run" / "coordinator.log"
    assert code == 1
    assert err.startswith(f"{prefix}coordinator was not ready after 0.2 s; "), err
    assert f"its log {log} is empty" in err or f"the end of its log {log}:" in err, err
    assert "Traceback" not in err
