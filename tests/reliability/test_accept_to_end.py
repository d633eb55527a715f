"""A large update's accept runs in a thread; the upload call may be cancelled meanwhile (its worker gone after
the last byte). The accept must still run to its end before the call lets go of the upload slot's memory."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from coordinator.uploads import run_to_end


def test_a_cancelled_wait_still_waits_for_the_accept_to_end() -> None:
    release, ended = threading.Event(), threading.Event()

    def accept() -> None:
        release.wait(10)
        ended.set()

    async def scenario() -> bool:
        with ThreadPoolExecutor(1) as pool:
            waiting = asyncio.create_task(run_to_end(pool, accept))
            await asyncio.sleep(0.05)
            waiting.cancel()  # the worker is gone
            await asyncio.sleep(0.1)
            still_waiting = not waiting.done()
            release.set()
            await waiting  # returns (the accept ran to its end) instead of raising CancelledError
            return still_waiting

    assert asyncio.run(scenario()) is True
    assert ended.is_set()


def test_the_accept_refusal_comes_through() -> None:
    def accept() -> None:
        raise ValueError("refused")

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            await run_to_end(pool, accept)

    with pytest.raises(ValueError, match="refused"):
        asyncio.run(scenario())
