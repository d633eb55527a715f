"""Upload streams in progress: one per worker, each ended when it stalls, when its round closes, or when its
worker joins again; and their receiving, bounded: at most `max_concurrent_uploads` buffered at once, in memory
reused round after round, a large update checked and folded in an accept thread. Used on the server's event
loop only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager

from fedcore.errors import FeddiffError, HeaderError, LateUpdate, UploadAborted, UploadInProgress, UploadStalled
from fedcore.wire import convert
from fedcore.wire.frames import ChunkMessage
from fedcore.wire.stream import Reassembler, ReceiveBuffer, StreamHeader

ENDS_PER_TURN = 16  # uploads ended in one turn of the event loop when their round closes
# An update up to this size is checked and folded on the event loop (about 1 ms at 16 MB: no thread hop for
# the common small update); a larger one in an accept thread, so that health checks and long polls are
# answered meanwhile (512 MB take about a second).
ACCEPT_ON_LOOP_MAX = 16 << 20
# A stream its client cancelled ends (no more messages) just before gRPC reports the cancellation: a stream
# that ends short waits this long for it before it is refused as short (`bad_size`) rather than `aborted`.
CANCELLED_CALL_GRACE = 0.2


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


async def run_to_end(executor: Executor, fn: Callable[[], None]) -> None:
    """Run `fn` in `executor` and wait for it, to its end even when the waiting task is cancelled meanwhile.

    For the accept of a large update: when its worker goes away after the last byte, the update is folded
    as if the answer had reached the worker, and the upload slot's memory, which `fn` reads, is not handed to
    the next upload before `fn` returns. Raises what `fn` raised."""
    running = asyncio.get_running_loop().run_in_executor(executor, fn)
    while True:
        try:
            await asyncio.shield(running)
            return
        except asyncio.CancelledError:
            if running.done():
                running.result()
                return


class UploadReceiver:
    """Receives upload streams into bounded memory and hands each complete payload to its `accept`."""

    def __init__(self, slots: int, idle_timeout: float):
        self.idle_timeout = idle_timeout  # seconds a stream may send nothing before it is cut off
        # Upload slots; the memory updates are received into is made when a slot first needs it and reused
        # round after round (never more buffers than uploads ever ran at once, whatever the setting).
        self._slots = asyncio.Semaphore(slots)
        self.receive_buffers: list[ReceiveBuffer] = []  # free ones, the warmest last
        self._accept_threads = ThreadPoolExecutor(slots, thread_name_prefix="feddiff-accept")

    def close(self) -> None:
        """End the accept threads (after the accepts in progress)."""
        self._accept_threads.shutdown(wait=True)

    async def receive(
        self,
        upload: OpenUpload,
        header: StreamHeader,
        limit: int,
        messages: AsyncIterator[ChunkMessage],
        *,
        on_wire: Callable[[int], None],
        accept: Callable[[bytes | bytearray | memoryview], None],
    ) -> None:
        """Read a stream's data messages (after its header) into a slot's memory, check them against `header`
        (at most `limit` bytes), and pass the payload to `accept`; the stream's errors, or `accept`'s, raised."""
        refusal = HeaderError("an update stream carries one header, then data only")
        async with self._slot(upload) as buffer:
            with Reassembler(header, max_bytes=limit, into=buffer) as receiver:
                async with upload.bounded(idle=self.idle_timeout):
                    async for msg in messages:
                        upload.progress()
                        receiver.feed(convert.data_in(msg, on_wire=on_wire, refusal=refusal))
                    if receiver.received < header.total_bytes:
                        await asyncio.sleep(CANCELLED_CALL_GRACE)  # cancelled meanwhile: `aborted`, not `bad_size`

                def finish() -> None:  # nothing refers to the slot's memory once it returns
                    accept(receiver.finish())

                if header.total_bytes <= ACCEPT_ON_LOOP_MAX:
                    finish()
                else:
                    await run_to_end(self._accept_threads, finish)

    @asynccontextmanager
    async def _slot(self, upload: OpenUpload) -> AsyncIterator[ReceiveBuffer]:
        """Back-pressure: at most `slots` updates are buffered and decoded at once; the others wait here,
        unread (held by HTTP/2 flow control, each at most the stream window of server.GRPC_OPTIONS), until a
        slot is free or their round closes."""
        async with upload.bounded():
            await self._slots.acquire()
        buffer = self.receive_buffers.pop() if self.receive_buffers else ReceiveBuffer()
        try:
            yield buffer
        finally:
            self.receive_buffers.append(buffer)
            self._slots.release()
