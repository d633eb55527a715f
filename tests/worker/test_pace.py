"""The worker's bandwidth cap: a paced stream never runs ahead of its rate, and 0 means no cap."""

from __future__ import annotations

import pytest

from fedcore.errors import SettingsError
from fedcore.settings import build
from worker.config import WorkerConfig
from worker.rpc import Pace


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_pace_holds_a_stream_to_its_rate() -> None:
    clock = FakeClock()
    pace = Pace(1000, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        pace.spent(500)  # sent instantly: each message waits for its half second
    assert clock.now - 100.0 == pytest.approx(2.5)
    assert clock.slept == pytest.approx([0.5] * 5)


def test_pace_does_not_sleep_when_the_link_is_slower_than_the_cap() -> None:
    clock = FakeClock()
    pace = Pace(1000, clock=clock, sleep=clock.sleep)
    pace.spent(500)
    clock.now += 2.0  # the next message took longer to send than the cap allows for
    pace.spent(500)
    assert clock.slept == pytest.approx([0.5])


def test_zero_means_no_cap() -> None:
    clock = FakeClock()
    pace = Pace(0, clock=clock, sleep=clock.sleep)
    pace.spent(10**9)
    assert clock.slept == []


def test_negative_rate_limits_are_refused() -> None:
    with pytest.raises(SettingsError, match=r"^upload_rate_limit = -1: expected an integer >= 0$"):
        build(WorkerConfig, {"coordinator": "h:1", "client_index": 0, "upload_rate_limit": -1})
