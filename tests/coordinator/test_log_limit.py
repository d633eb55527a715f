"""Refusals' log lines limited per reason and window, with what was held back said."""

from __future__ import annotations

import logging

import pytest

from coordinator.log_limit import LimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records]
    caplog.clear()
    return lines


def test_a_flood_of_one_reason_logs_its_first_lines_then_says_how_many_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = LimitedLog(logging.getLogger("test.limited"), per_window=3, window=60.0, clock=clock)
    caplog.set_level(logging.WARNING, "test.limited")

    for i in range(1000):
        log.refused("too_large", "update refused: too_large: %d", i)
    log.refused("bad_worker_info", "join refused: bad_worker_info")  # another reason has a window of its own
    first = _lines(caplog)
    clock.now += 59.9
    log.refused("too_large", "update refused: too_large: late")
    same_window = _lines(caplog)
    clock.now += 0.1
    log.refused("too_large", "update refused: too_large: next")
    next_window = _lines(caplog)

    assert first == [
        "update refused: too_large: 0",
        "update refused: too_large: 1",
        "update refused: too_large: 2",
        "more too_large lines in this 60 s are counted in the metrics, not logged",
        "join refused: bad_worker_info",
    ]
    assert same_window == []
    assert next_window == ["998 more too_large lines were not logged in the last 60 s (the metrics count them all)", "update refused: too_large: next"]


def test_a_window_without_a_held_line_starts_the_next_one_silently(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = LimitedLog(logging.getLogger("test.limited"), per_window=2, window=10.0, clock=clock)
    caplog.set_level(logging.WARNING, "test.limited")

    log.refused("late", "a")
    clock.now += 10
    log.refused("late", "b")

    assert _lines(caplog) == ["a", "b"]


@pytest.mark.parametrize(("per_window", "window"), [(0, 60.0), (5, 0.0)])
def test_a_limit_that_logs_nothing_is_refused(per_window: int, window: float) -> None:
    with pytest.raises(ValueError, match=f"per_window {per_window} and window {window} s"):
        LimitedLog(logging.getLogger("test.limited"), per_window=per_window, window=window)
