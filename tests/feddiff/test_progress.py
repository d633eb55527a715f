"""The sampling progress of `feddiff sample` and `evaluate` (feddiff.progress): on stderr, never on stdout."""

from __future__ import annotations

import io

import pytest

from feddiff import progress
from feddiff.progress import SamplingBar


def _run(mode: str, steps: int = 4) -> str:
    stream = io.StringIO()
    with SamplingBar("sampling 8 images", mode, stream) as bar:
        for done in range(1, steps + 1):
            bar.step(done, steps)
    return stream.getvalue()


def test_log_lines_say_how_far_and_how_long_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)

    lines = _run("log").splitlines()

    assert [line.split(", ")[0] for line in lines] == [f"sampling 8 images: {d}/4 steps ({25 * d}%)" for d in range(1, 5)]
    assert all(line.endswith(" s left") for line in lines)


def test_log_lines_come_at_most_every_interval() -> None:
    assert _run("log", steps=1000) == ""  # far less than LOG_EVERY_SECONDS


def test_auto_on_a_pipe_is_log_lines_and_off_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.0)

    assert SamplingBar("x", "auto", io.StringIO()).mode == "log"
    assert _run("off") == ""


def test_the_bar_draws_on_its_stream_and_leaves_nothing_behind() -> None:
    stream = io.StringIO()
    with SamplingBar("sampling 8 images", "bar", stream) as bar:
        bar.step(2, 4)
        assert bar._bar is not None and bar._bar.tasks[0].completed == 2 and bar._bar.tasks[0].total == 4
    assert bar._bar is None
