"""A hand-driven worker for tests: joins and sends whatever messages a test wants, well-formed or not."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import grpc

from fedcore.federation.client import TrainTask
from fedcore.wire import convert
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2_grpc as pb_grpc
from fedcore.wire.stream import StreamHeader


@dataclass
class RawWorker:
    channel: grpc.Channel
    worker_id: str
    num_examples: int = 100
    metadata: tuple[tuple[str, str], ...] = ()
    installation_id: str = ""  # as saved in a worker's state dir ("": a worker that predates it)
    instance_id: str = ""
    session_id: str = ""
    stub: pb_grpc.CoordinatorStub = field(init=False)

    def __post_init__(self) -> None:
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    def join(self, has_private_state: bool = False, digests: Iterable[str] = ()) -> pb.JoinResponse:
        """Join as a worker that checks `digests` besides SHA-256 (none: as a worker that predates BLAKE3)."""
        info = pb.WorkerInfo(
            worker_id=self.worker_id, device="cpu", num_examples=self.num_examples, software_version="test",
            has_private_state=has_private_state, digests=list(digests), installation_id=self.installation_id, instance_id=self.instance_id,
        )  # fmt: skip
        resp = self.stub.Join(pb.JoinRequest(worker=info), timeout=10, metadata=self.metadata)
        self.session_id = resp.session_id
        return resp

    def wait_task(self, timeout: float = 20.0) -> pb.Task:
        resp = self.stub.WaitTask(pb.WaitTaskRequest(session_id=self.session_id, timeout_ms=int(timeout * 1000)), timeout=timeout + 10, metadata=self.metadata)
        assert resp.WhichOneof("outcome") == "task", resp
        return resp.task

    def download(self, task_id: str) -> tuple[pb.StreamHeader, bytes]:
        stream = self.stub.DownloadWeights(pb.DownloadRequest(session_id=self.session_id, task_id=task_id), timeout=30, metadata=self.metadata)
        msgs = list(stream)
        return msgs[0].header, b"".join(m.data for m in msgs[1:])

    def upload_messages(self, messages: Iterable[pb.UpdateChunk], timeout: float = 30.0) -> pb.UploadResponse:
        return self.stub.UploadUpdate(iter(messages), timeout=timeout, metadata=self.metadata)

    def update_messages(
        self,
        task: TrainTask,
        payload: bytes,
        *,
        header: StreamHeader | None = None,
        task_id: str | None = None,
        round_index: int | None = None,
        parts: Iterable[str] | None = None,
        chunk_size: int = 1 << 16,
        images_seen: int | None = None,
        mean_loss: float = 0.5,
    ) -> Iterator[pb.UpdateChunk]:
        """A header then chunks; every field can be overridden to make the stream wrong on purpose. The report
        says one epoch over the images this worker declared, unless `images_seen` says otherwise."""
        header = header or StreamHeader.of(payload)
        images_seen = self.num_examples if images_seen is None else images_seen
        stream = convert.header_to_proto(
            header,
            wire_round=task.round_index if round_index is None else round_index,
            task_id=task.task_id if task_id is None else task_id,
            parts=task.returns,
        )
        if parts is not None:
            del stream.parts[:]
            stream.parts.extend(parts)
        yield pb.UpdateChunk(
            header=pb.UpdateHeader(session_id=self.session_id, stream=stream, report=pb.TrainReport(images_seen=images_seen, mean_loss=mean_loss, seconds=1.0))
        )
        for start in range(0, len(payload), chunk_size):
            yield pb.UpdateChunk(data=payload[start : start + chunk_size])


class StalledUpload:
    """An upload that sends its first `messages` (the header, then data), then nothing until `release` is set;
    `call` is the call's future, `stalled_at` the monotonic time its last message was handed to gRPC."""

    def __init__(self, worker: RawWorker, messages: Iterable[pb.UpdateChunk], release: threading.Event, timeout: float = 120.0):
        self.stalled_at = 0.0
        sent = list(messages)

        def stall() -> Iterator[pb.UpdateChunk]:
            yield from sent
            self.stalled_at = time.monotonic()
            release.wait()

        self.call: grpc.Future = worker.stub.UploadUpdate.future(stall(), timeout=timeout, metadata=worker.metadata)

    def code(self, timeout: float) -> grpc.StatusCode:
        """The status the call ended with, within `timeout` seconds (AssertionError if it is still open)."""
        try:
            self.call.result(timeout=timeout)
            return grpc.StatusCode.OK
        except grpc.FutureTimeoutError:
            raise AssertionError(f"the upload was still open after {timeout} s") from None
        except grpc.RpcError as e:
            return e.code()
