"""The worker's gRPC client: one channel, typed calls, chunked weight streams in both directions."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import grpc

import fedcore
from fedcore.errors import HeaderError
from fedcore.federation.client import EvalTask, TrainTask
from fedcore.wire import bounds, convert, frames
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2_grpc as pb_grpc
from fedcore.wire.stream import DIGESTS, LEGACY_DIGEST, MAX_CHUNK_SIZE, MAX_MESSAGE_BYTES, MIN_CHUNK_SIZE, ReceiveBuffer, StreamHeader, digest_for
from service.channels import channel_to
from worker.config import WorkerConfig

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A connection of its own, also beside other workers in one process (gRPC would share one between channels
    # to one address): the coordinator bounds the calls of a connection (max_streams_per_connection).
    ("grpc.use_local_subchannel_pool", 1),
]


def open_channel(cfg: WorkerConfig) -> grpc.Channel:
    """TLS (mutual with a client certificate) or, with --insecure, plain text."""
    if not cfg.tls_ca and not cfg.insecure:
        raise ValueError("no --tls-ca given: pass TLS settings, or --insecure for plain-text gRPC")
    return channel_to(cfg.coordinator, cfg.tls_ca, cfg.tls_key, cfg.tls_cert, cfg.tls_server_name, CHANNEL_OPTIONS)


MIN_PACED_CHUNK = 4096  # bytes: the smallest message a rate-limited upload is cut into


class Pace:
    """Holds one stream to at most `bytes_per_second` (0 = no limit): `spent(n)` after each message sleeps
    until the bytes so far are due."""

    def __init__(self, bytes_per_second: int, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.bytes_per_second = bytes_per_second
        self._clock = clock
        self._sleep = sleep
        self._start: float | None = None
        self._bytes = 0

    def spent(self, n: int) -> None:
        if self.bytes_per_second <= 0:
            return
        if self._start is None:
            self._start = self._clock()
        self._bytes += n
        ahead = self._bytes / self.bytes_per_second - (self._clock() - self._start)
        if ahead > 0:
            self._sleep(ahead)


class CoordinatorClient:
    """Typed calls to the coordinator; the session id is kept here once joined."""

    def __init__(
        self,
        channel: grpc.Channel,
        metadata: tuple[tuple[str, str], ...] = (),
        *,
        upload_rate_limit: int = 0,
        download_rate_limit: int = 0,
    ):
        self.stub = pb_grpc.CoordinatorStub(channel)
        # The weights streams read and write their data messages with the chunk frames (no protobuf copies).
        self._download_weights: grpc.UnaryStreamMultiCallable[pb.DownloadRequest, pb.WeightsChunk | frames.DataChunk] = channel.unary_stream(
            "/feddiff.v1.Coordinator/DownloadWeights",
            request_serializer=pb.DownloadRequest.SerializeToString,
            response_deserializer=frames.parser(pb.WeightsChunk),
        )
        self._upload_update: grpc.StreamUnaryMultiCallable[pb.UpdateChunk | bytes, pb.UploadResponse] = channel.stream_unary(
            "/feddiff.v1.Coordinator/UploadUpdate",
            request_serializer=frames.serialize,
            response_deserializer=pb.UploadResponse.FromString,
        )
        self.metadata = metadata
        self.upload_rate_limit = upload_rate_limit  # bytes per second, 0 = none
        self.download_rate_limit = download_rate_limit
        self.session_id = ""
        self.chunk_size = 1 << 20
        self.heartbeat_interval = 5.0
        self._received = ReceiveBuffer()  # one download at a time: every round reuses the same memory
        self.upload_digest = LEGACY_DIGEST  # until the coordinator names the digests it checks (Join)
        self._waiting: grpc.Future | None = None  # the long poll in progress

    def join(self, info: pb.WorkerInfo, timeout: float = 30.0) -> pb.JoinResponse:
        resp = self.stub.Join(pb.JoinRequest(worker=info), timeout=timeout, metadata=self.metadata)
        self.session_id = resp.session_id
        self.chunk_size = min(max(resp.chunk_size, MIN_CHUNK_SIZE), MAX_CHUNK_SIZE)
        self.heartbeat_interval = max(resp.heartbeat_interval_ms / 1000, 0.2)
        self.upload_digest = digest_for(resp.digests)
        return resp

    def heartbeat(self) -> None:
        self.stub.Heartbeat(pb.HeartbeatRequest(session_id=self.session_id), timeout=10, metadata=self.metadata)

    def leave(self) -> None:
        self.stub.Leave(pb.LeaveRequest(session_id=self.session_id), timeout=5, metadata=self.metadata)

    def wait_task(self, timeout: float, stop: threading.Event | None = None) -> pb.WaitTaskResponse:
        """The coordinator's answer to a long poll of `timeout` seconds. `cancel_wait` (or `stop`, set before
        the poll could be cancelled) ends it at once: grpc.FutureCancelledError."""
        req = pb.WaitTaskRequest(session_id=self.session_id, timeout_ms=int(timeout * 1000))
        call = self.stub.WaitTask.future(req, timeout=timeout + 30, metadata=self.metadata)
        self._waiting = call
        try:
            if stop is not None and stop.is_set():
                call.cancel()
            return call.result()
        finally:
            self._waiting = None

    def cancel_wait(self) -> None:
        """End the long poll in progress, if any (a stop: SIGTERM): `wait_task` raises FutureCancelledError at once."""
        call = self._waiting
        if call is not None:
            call.cancel()

    def download(self, task: TrainTask | EvalTask, *, max_bytes: int, on_wire: Callable[[int], None]) -> memoryview:
        """The task's weights payload, checked against its header (size, hash) before it is returned. It lives
        in memory this client reuses: the view is valid until the next download."""
        stream = self._download_weights(pb.DownloadRequest(session_id=self.session_id, task_id=task.task_id), metadata=self.metadata)
        first = next(stream, None)
        if not isinstance(first, pb.WeightsChunk) or not first.HasField("header"):  # None, or data first
            raise HeaderError("weights stream did not start with a header")
        on_wire(first.ByteSize())
        h = first.header
        if h.task_id != task.task_id or h.round != task.wire_round or convert.parts_from_proto(h.parts) != task.receives:
            raise HeaderError(f"weights header for task {h.task_id!r} round {h.round}, expected {task.task_id!r}")

        pace = Pace(self.download_rate_limit)

        def counted(size: int) -> None:
            on_wire(size)
            pace.spent(size)

        data = convert.data_of(stream, on_wire=counted, refusal=HeaderError("weights stream carries one header, then data only"))
        return convert.reassemble(convert.header_from_proto(h), data, max_bytes=max_bytes, into=self._received)

    def upload(
        self,
        task: TrainTask,
        payload: bytes,
        report: pb.TrainReport,
        *,
        on_wire: Callable[[int], None],
        header: StreamHeader | None = None,
    ) -> pb.UploadResponse:
        """Stream an update: its header (size, digest: computed here unless the caller has it), then chunks."""
        header = header or StreamHeader.of(payload, self.upload_digest)
        pace = Pace(self.upload_rate_limit)
        chunk_size = self.chunk_size
        if self.upload_rate_limit > 0:  # paced in messages of about a tenth of a second, not one burst a chunk
            chunk_size = min(chunk_size, max(MIN_PACED_CHUNK, self.upload_rate_limit // 10))

        def messages() -> Iterator[pb.UpdateChunk | bytes]:
            first = pb.UpdateChunk(
                header=pb.UpdateHeader(
                    session_id=self.session_id,
                    stream=convert.header_to_proto(header, wire_round=task.round_index, task_id=task.task_id, parts=task.returns),
                    report=report,
                )
            )
            on_wire(first.ByteSize())
            yield first
            for frame in frames.data_frames(payload, chunk_size):
                on_wire(len(frame))
                yield frame
                pace.spent(len(frame))

        return self._upload_update(messages(), metadata=self.metadata)

    def reject_task(self, task_id: str, reason: str, message: str) -> None:
        """Tell the coordinator this worker cannot run a task (`reason`: a TaskRefused reason); the message is
        brought within the contract's bound (a coordinator refuses one beyond it)."""
        request = pb.RejectTaskRequest(session_id=self.session_id, task_id=task_id, reason=reason, message=bounds.bounded_text(message))
        self.stub.RejectTask(request, timeout=30, metadata=self.metadata)

    def report_evaluation(self, report: pb.EvaluationReport) -> None:
        report.session_id = self.session_id
        self.stub.ReportEvaluation(report, timeout=60, metadata=self.metadata)


def worker_info(worker_id: str, device: str, num_examples: int, has_private_state: bool, *, installation_id: str = "", instance_id: str = "") -> pb.WorkerInfo:
    """What the worker tells the coordinator when it joins; `installation_id` (saved in its state dir) and
    `instance_id` (new in every process) tell a restart from another process using the same worker id."""
    import torch

    gpu_name, gpu_mem = "", 0
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        gpu_name, gpu_mem = props.name, props.total_memory
    return pb.WorkerInfo(
        worker_id=worker_id,
        device=device,
        gpu_name=gpu_name,
        gpu_memory_bytes=gpu_mem,
        num_examples=num_examples,
        software_version=f"feddiff {fedcore.__version__} on {socket.gethostname()}",
        has_private_state=has_private_state,
        digests=sorted(set(DIGESTS) - {LEGACY_DIGEST}),
        installation_id=installation_id,
        instance_id=instance_id,
    )
