"""Upload streams in progress: one per worker, each ended when it stalls, when its round closes, or when its
worker joins again. Used on the server's event loop only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

from fedcore.errors import FeddiffError, LateUpdate, UploadAborted, UploadInProgress, UploadStalled

ENDS_PER_TURN = 16  # uploads ended in one turn of the event loop when their round closes


class OpenUpload:
    """One worker's upload stream while the coordinator waits for a slot for it or reads it."""

    def __init__(self, worker_id: str, session_id: str, task_id: str):
        self.worker_id = worker_id
        self.session_id = session_id
        self.task_id = task_id
        self._ended: FeddiffError | None = None  # why the coordinator ends it early
        self._scope: asyncio.Timeout | None = None
        self._idle: float | None = None

    def end(self, error: FeddiffError) -> None:
        """End the stream with `error`: its `bounded` block stops at once (a first reason stands)."""
        if self._ended is None:
            self._ended = error
            if self._scope is not None and not self._scope.expired():
                self._scope.reschedule(asyncio.get_running_loop().time())

    def progress(self) -> None:
        """A message arrived: the idle time starts again."""
        if self._scope is not None and self._idle is not None and not self._scope.expired():
            self._scope.reschedule(asyncio.get_running_loop().time() + self._idle)

    @asynccontextmanager
    async def bounded(self, idle: float | None = None) -> AsyncIterator[None]:
        """Run the block until it ends by itself, until `end` is called (raising its error), or, with `idle`,
        until `idle` seconds pass without `progress` (UploadStalled)."""
        if self._ended is not None:
            raise self._ended
        try:
            async with asyncio.timeout(None) as scope:
                self._scope, self._idle = scope, idle
                self.progress()
                yield
        except TimeoutError:
            if self._ended is not None:
                raise self._ended from None
            raise UploadStalled(
                f"upload of task {self.task_id!r} from worker {self.worker_id!r} received nothing for {idle:g} s (upload_idle_timeout): cut off"
            ) from None
        finally:
            self._scope = self._idle = None


class OpenUploads:
    """The upload streams in progress, by worker: no worker holds more than one upload slot, nor the receive
    memory of more than one stream."""

    def __init__(self) -> None:
        self._by_worker: dict[str, OpenUpload] = {}

    def __len__(self) -> int:
        return len(self._by_worker)

    @contextmanager
    def open(self, worker_id: str, session_id: str, task_id: str) -> Iterator[OpenUpload]:
        """Register a stream for its worker's one place; UploadInProgress when that session has a stream open.

        A stream of an earlier session of the same worker (it joined again after its connection broke, while
        the coordinator still waits on the dead stream) is ended instead: the newer session is the live one."""
        current = self._by_worker.get(worker_id)
        if current is not None:
            if current.session_id == session_id:
                raise UploadInProgress(f"worker {worker_id!r} already has an upload in progress (task {current.task_id!r}); one at a time")
            current.end(UploadAborted(f"worker {worker_id!r} joined again and uploads anew: the upload of its ended session is cut off"))
        upload = self._by_worker[worker_id] = OpenUpload(worker_id, session_id, task_id)
        try:
            yield upload
        finally:
            if self._by_worker.get(worker_id) is upload:
                del self._by_worker[worker_id]

    def end_closed(self, accepting: Callable[[str], bool]) -> None:
        """End every stream whose round no longer takes its update: a stream never outlives its round."""
        self._end_in_turns([u for u in self._by_worker.values() if not accepting(u.task_id)])

    def _end_in_turns(self, uploads: list[OpenUpload]) -> None:
        """End `ENDS_PER_TURN` of `uploads` now and the rest in the event loop's next turns: hundreds of streams
        ended in one turn would delay every other call (a health check) until all of them were answered."""
        for upload in uploads[:ENDS_PER_TURN]:
            upload.end(LateUpdate(f"task {upload.task_id!r}: its round closed before the upload was complete"))
        if len(uploads) > ENDS_PER_TURN:
            asyncio.get_running_loop().call_soon(self._end_in_turns, uploads[ENDS_PER_TURN:])
