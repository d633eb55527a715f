"""Downloads in progress (DownloadWeights), each written as its stream header then its payload in chunks: one
per worker, each ended when its task's round closes, when its worker reads nothing of it for
`download_idle_timeout`, or when its worker joined again and downloads anew. A download that is not read holds
its unsent messages in the coordinator's memory, and a place among the server's calls: until its worker reads
or its connection ends, even once ended, since HTTP/2 sends a stream's end after its data. These bounds keep
that to one stream per worker. Used on the server's event loop only."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from coordinator.uploads import ENDS_PER_TURN
from fedcore.errors import DownloadEnded, DownloadInProgress, DownloadStalled, DownloadSuperseded, TaskClosed
from fedcore.wire import frames
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb

STATUS_GRACE = 1.0  # seconds an ended download's last message may take to go out before its status


class OpenDownload:
    """One worker's download while the coordinator writes it."""

    def __init__(self, worker_id: str, session_id: str, task_id: str, idle_timeout: float):
        self.worker_id = worker_id
        self.session_id = session_id
        self.task_id = task_id
        self.idle_timeout = idle_timeout
        self._ended: DownloadEnded | None = None  # why the coordinator ends it early
        self._end = asyncio.Event()

    def end(self, error: DownloadEnded) -> None:
        """End the stream with `error`: the write in progress stops at once (a first reason stands)."""
        if self._ended is None:
            self._ended = error
            self._end.set()

    async def write(self, context: grpc.aio.ServicerContext, message: object) -> None:
        """Send one message; raises why the stream was ended meanwhile, or DownloadStalled when the worker
        read nothing for `idle_timeout` seconds (the write waits on HTTP/2 flow control, that is on the
        worker's reading); wrapped in Unsendable when the message being written does not go out either."""
        if self._ended is not None:
            raise self._ended
        write = asyncio.ensure_future(context.write(message))
        ended = asyncio.ensure_future(self._end.wait())
        try:
            done, _ = await asyncio.wait((write, ended), timeout=self.idle_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if write in done:
            write.result()
            return
        error = self._ended or DownloadStalled(
            f"download of task {self.task_id!r} by worker {self.worker_id!r}: nothing read for {self.idle_timeout:g} s (download_idle_timeout): cut off"
        )
        # gRPC sends a call's status after its messages: it can follow the message being written only once that
        # is sent, that is once the worker reads.
        await asyncio.wait((write,), timeout=STATUS_GRACE)
        if write.done() and not write.cancelled() and write.exception() is None:
            raise error
        write.cancel()
        raise Unsendable(error)


class Unsendable(Exception):
    """A download ended (`error`) while its worker reads nothing: no status can reach it, the call ends without."""

    def __init__(self, error: DownloadEnded):
        super().__init__(str(error))
        self.error = error


class OpenDownloads:
    """The downloads in progress, by worker: none holds the unsent messages of more than one."""

    def __init__(self, idle_timeout: float, chunk_size: int):
        self.idle_timeout = idle_timeout
        self.chunk_size = chunk_size  # payload bytes in each data message
        self._by_worker: dict[str, OpenDownload] = {}

    def __len__(self) -> int:
        return len(self._by_worker)

    async def send(self, context: grpc.aio.ServicerContext, worker_id: str, session_id: str, task_id: str, header: pb.WeightsChunk, payload: bytes) -> int:
        """Write a task's download in its worker's one place (`open`): its header, then its payload in chunks;
        the bytes written, once the worker drained them. Raises why it ended early (a DownloadEnded), or
        Unsendable when no status can reach the worker either."""
        with self.open(worker_id, session_id, task_id, context) as download:
            await download.write(context, header)
            sent = header.ByteSize()
            for frame in frames.data_frames(payload, self.chunk_size):
                await download.write(context, frame)  # serialized already: the method's serializer (frames.serialize) takes both
                sent += len(frame)
        return sent

    @contextmanager
    def open(self, worker_id: str, session_id: str, task_id: str, context: grpc.aio.ServicerContext) -> Iterator[OpenDownload]:
        """Register a stream in its worker's one place; DownloadInProgress when that session has one that has
        not ended on the wire (being written, or ended by the coordinator while its worker reads nothing).

        A stream of an earlier session of the same worker (it joined again after its connection broke, while
        the coordinator still writes to the dead stream) is ended instead (DownloadSuperseded). A stream that
        ends early keeps its place until its call is over (its worker read the end, or its connection closed)."""
        current = self._by_worker.get(worker_id)
        if current is not None:
            if current.session_id == session_id:
                raise DownloadInProgress(f"worker {worker_id!r} already has a download open (task {current.task_id!r}); one at a time")
            current.end(DownloadSuperseded(f"worker {worker_id!r} joined again and downloads anew: the download of its ended session is cut off"))
        download = self._by_worker[worker_id] = OpenDownload(worker_id, session_id, task_id, self.idle_timeout)
        try:
            yield download
        except BaseException:
            if context.done():
                self._release(download)
            else:
                context.add_done_callback(lambda _: self._release(download))  # type: ignore[arg-type]  # the stubs' callback type is a class no function matches
            raise
        self._release(download)

    def _release(self, download: OpenDownload) -> None:
        if self._by_worker.get(download.worker_id) is download:
            del self._by_worker[download.worker_id]

    def end_closed(self, accepting: Callable[[str], bool]) -> None:
        """End every stream whose task's round has closed: a download never outlives its round."""
        self._end_in_turns([d for d in self._by_worker.values() if not accepting(d.task_id)])

    def _end_in_turns(self, downloads: list[OpenDownload]) -> None:
        for download in downloads[:ENDS_PER_TURN]:
            download.end(TaskClosed(f"task {download.task_id!r}: its round closed before its payload was read"))
        if len(downloads) > ENDS_PER_TURN:
            asyncio.get_running_loop().call_soon(self._end_in_turns, downloads[ENDS_PER_TURN:])
