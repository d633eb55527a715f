"""Long polls for tasks: each waits for the phase's next change (tasks issued, state; coordinator/phase.py) until
its timeout, and a session holds one at a time: a newer poll answers the older at once (IDLE), so that a session
that asks thousands of times holds one waiting call, not thousands of the server's; a session that ends (its
worker leaves, or joins again) has its poll answered at once too, and the caller then finds the session gone.
Used on the server's event loop only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from coordinator.phase import PollEnd, PollOutcome

log = logging.getLogger("feddiff.coordinator")

MAX_WAIT_MS = 60_000  # the longest a poll waits, whatever it asks (0: this long)


class Changes:
    """The phase's changes as an asyncio signal: `current()` is set at the next one.

    `notify` may be called from any thread; the event is set on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def current(self) -> asyncio.Event:
        return self._event


class LongPolls:
    """The long polls in progress, one per session, each asking `poll_task` again at every change (`changes`,
    told of them by the phase's `on_change`)."""

    def __init__(self, poll_task: Callable[[str], PollOutcome | None], loop: asyncio.AbstractEventLoop):
        self._poll_task = poll_task  # a worker's task now, its run's end, or None (`Phase.poll_task`)
        self.changes = Changes(loop)
        self._by_session: dict[str, asyncio.Event] = {}  # session id -> what ends its long poll in progress
        self._worker_of: dict[str, str] = {}  # session id -> worker id, for the polls in progress

    async def next_task(self, worker_id: str, session_id: str, timeout_ms: int) -> PollOutcome:
        """This worker's task, DONE or STOPPED; IDLE after `timeout_ms` (at most MAX_WAIT_MS; 0 asks for that
        much) or once a newer poll of the same session comes."""
        timeout = min(timeout_ms or MAX_WAIT_MS, MAX_WAIT_MS) / 1000
        with self._one_per_session(worker_id, session_id) as superseded:
            return await self._wait(worker_id, timeout, superseded)

    def end_session(self, session_id: str) -> None:
        """The session ended (its worker left): its poll in progress, if any, is answered at once."""
        ending = self._by_session.get(session_id)
        if ending is not None:
            ending.set()

    def end_sessions_of(self, worker_id: str, but: str) -> None:
        """The worker joined again as session `but`: the polls of its earlier sessions are answered at once."""
        for session_id in [s for s, w in self._worker_of.items() if w == worker_id and s != but]:
            self.end_session(session_id)

    @contextlib.contextmanager
    def _one_per_session(self, worker_id: str, session_id: str) -> Iterator[asyncio.Event]:
        """The session's one poll: an older one still waiting is answered at once."""
        older = self._by_session.get(session_id)
        if older is not None:
            older.set()
            log.debug("long poll of session %s superseded by a newer one", session_id[:8])
        mine = self._by_session[session_id] = asyncio.Event()
        self._worker_of[session_id] = worker_id
        try:
            yield mine
        finally:
            if self._by_session.get(session_id) is mine:
                del self._by_session[session_id]
                del self._worker_of[session_id]

    async def _wait(self, worker_id: str, timeout: float, superseded: asyncio.Event) -> PollOutcome:
        """This worker's task, DONE, STOPPED, or IDLE after `timeout` seconds or once `superseded`."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    change = self.changes.current()  # taken before asking: a change after the answer sets it
                    outcome = self._poll_task(worker_id)
                    if outcome is not None:
                        return outcome
                    if superseded.is_set():
                        return PollEnd.IDLE
                    await first_of(change, superseded)
        except TimeoutError:
            return PollEnd.IDLE


async def first_of(*events: asyncio.Event) -> None:
    """Wait until one of `events` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
