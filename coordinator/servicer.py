"""gRPC servicer on the asyncio server: protobuf in, one call into the round driver or registry, protobuf or a
mapped status out. Handlers run on the server's event loop and never block it: a long poll awaits the
driver's next change, and a large update is checked and folded in an accept thread. Upload streams are
bounded: one per worker (`coordinator.uploads`), cut off when they stall or when their round closes."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import NoReturn

import grpc
from google.protobuf.message import Message

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.registry import WorkerInfo, WorkerRegistry
from coordinator.rounds import IssuedTask, RoundDriver
from coordinator.security import Authenticator
from coordinator.status import abort
from coordinator.uploads import OpenUpload, OpenUploads
from fedcore.errors import BadWorkerInfo, FeddiffError, FieldOutOfRange, HeaderError, SizeMismatch, UnknownWorker, UploadAborted, UploadStalled
from fedcore.federation.client import EvalTask
from fedcore.wire import bounds, codec, convert
from fedcore.wire.codec import DataChunk
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2_grpc as pb_grpc
from fedcore.wire.stream import DIGESTS, LEGACY_DIGEST, Reassembler, ReceiveBuffer, StreamHeader

log = logging.getLogger("feddiff.coordinator")

MAX_WAIT_MS = 60_000
# An update up to this size is checked and folded on the event loop (about 1 ms at 16 MB: no thread hop for
# the common small update); a larger one in an accept thread, so that health checks and long polls are
# answered meanwhile (512 MB take about a second).
ACCEPT_ON_LOOP_MAX = 16 << 20
# A stream its client cancelled ends (no more messages) just before gRPC reports the cancellation: a stream
# that ends short waits this long for it before it is refused as short (`bad_size`) rather than `aborted`.
CANCELLED_CALL_GRACE = 0.2


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


class Changes:
    """The driver's changes (tasks issued, state) as an asyncio signal: `current()` is set at the next one.

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


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Create it on the event loop that serves it."""

    def __init__(self, cfg: CoordinatorConfig, driver: RoundDriver, registry: WorkerRegistry, metrics: Metrics, auth: Authenticator):
        self.cfg = cfg
        self.auth = auth
        self.driver = driver
        self.registry = registry
        self.metrics = metrics
        loop = asyncio.get_running_loop()
        self._changes = Changes(loop)
        self._uploads = OpenUploads()
        end_closed = functools.partial(self._uploads.end_closed, driver.accepting)
        self._unsubscribe = [
            driver.on_change(self._changes.notify),
            driver.on_change(lambda: loop.call_soon_threadsafe(end_closed)),
        ]
        # Upload slots; the memory updates are received into is made when a slot first needs it and reused
        # round after round (never more buffers than uploads ever ran at once, whatever the setting).
        slots = max(1, cfg.max_concurrent_uploads)
        self._upload_slots = asyncio.Semaphore(slots)
        self._receive_buffers: list[ReceiveBuffer] = []  # free ones, the warmest last
        self._accept_threads = ThreadPoolExecutor(slots, thread_name_prefix="feddiff-accept")

    def close(self) -> None:
        """Stop hearing of the driver's changes (the event loop is about to close); end the accept threads."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._accept_threads.shutdown(wait=True)

    async def _refuse(self, context: grpc.aio.ServicerContext, error: FeddiffError) -> NoReturn:
        """End an upload with its outcome counted: refused, or cut off on the way (`aborted`: not refused)."""
        self.metrics.updates.labels(error.reason).inc()
        if isinstance(error, UploadAborted):
            log.warning("upload cut off (%s): %s", error.reason, error)
        else:
            log.warning("update refused: %s: %s", error.reason, error)
        await abort(context, error)

    async def _worker(self, session_id: str, context: grpc.aio.ServicerContext, *, counted: bool = False) -> str:
        """The worker behind a session, checked against the caller's verified identity, else UnknownWorker;
        `counted` refusals (uploads) show in feddiff_updates_total, the others in feddiff_refusals_total."""
        try:
            worker_id = self.registry.touch(session_id).worker_id
            self.auth.check(context, worker_id)
            return worker_id
        except UnknownWorker as e:
            if counted:
                self.metrics.updates.labels(e.reason).inc()
                await abort(context, e)
            raise

    # --- membership ------------------------------------------------------------------------------------------
    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinResponse:
        try:
            session = self._join(request.worker, context)
        except FeddiffError as e:
            self.metrics.joins.labels(e.reason).inc()
            log.warning("refused join of %r: %s: %s", request.worker.worker_id[:140], e.reason, e)
            await abort(context, e)
        # Before it hears of its session: a task it could only fail is replaced (hashing a payload, off the loop).
        await asyncio.get_running_loop().run_in_executor(None, self.driver.joined, request.worker.worker_id)
        self.metrics.joins.labels("accepted").inc()
        fed = self.driver.federation.config
        return pb.JoinResponse(
            session_id=session,
            heartbeat_interval_ms=int(self.cfg.heartbeat_interval * 1000),
            model=fed.model,
            strategy=fed.strategy.value,
            chunk_size=self.cfg.chunk_size,
            rounds=fed.rounds,
            digests=sorted(set(DIGESTS) - {LEGACY_DIGEST}),
        )

    def _join(self, w: pb.WorkerInfo, context: grpc.aio.ServicerContext) -> str:
        """A session for a checked, verified worker; BadWorkerInfo (a field outside its bound), UnknownWorker,
        UnregisteredWorker or DuplicateWorker."""
        bounds.check(w, BadWorkerInfo)
        self.auth.check(context, w.worker_id)
        self.driver.admit(w.worker_id, w.num_examples)
        info = WorkerInfo(
            worker_id=w.worker_id,
            device=w.device,
            gpu_name=w.gpu_name,
            gpu_memory_bytes=w.gpu_memory_bytes,
            num_examples=w.num_examples,
            software_version=w.software_version,
            has_private_state=w.has_private_state,
            digests=frozenset(w.digests) & frozenset(DIGESTS),
            installation_id=w.installation_id,
            instance_id=w.instance_id,
        )
        session, replaced = self.registry.join(info)
        again = ""
        if replaced is not None:
            again = " again, ending its earlier session" if replaced.info.instance_id == w.instance_id else " after a restart, ending its earlier session"
        record = self.registry.record(w.worker_id)
        if w.has_private_state and record is not None and not record.info.has_private_state:
            again += " from another installation than before, which holds none of its private parts"
        log.info("worker %s joined%s (%s%s, %d images)", w.worker_id, again, w.device, f" {w.gpu_name}" if w.gpu_name else "", w.num_examples)
        return session

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        await self._worker(request.session_id, context)
        return pb.HeartbeatResponse(round=self.driver.federation.completed_rounds)

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.LeaveResponse:
        await self._worker(request.session_id, context)
        self.registry.leave(request.session_id)
        return pb.LeaveResponse()

    # --- tasks -----------------------------------------------------------------------------------------------
    async def WaitTask(self, request: pb.WaitTaskRequest, context: grpc.aio.ServicerContext) -> pb.WaitTaskResponse:
        worker_id = await self._worker(request.session_id, context)
        timeout = min(request.timeout_ms or MAX_WAIT_MS, MAX_WAIT_MS) / 1000
        outcome = await self._next_task(worker_id, timeout)
        self.registry.touch(request.session_id)  # UnknownWorker when the session ended meanwhile (a restart)
        if outcome == "done":
            return pb.WaitTaskResponse(done=pb.Done(rounds=self.driver.federation.completed_rounds, error=self.driver.failure))
        if outcome in ("idle", "stopped"):
            return pb.WaitTaskResponse(idle=pb.Idle())
        assert isinstance(outcome, IssuedTask)
        if isinstance(outcome.task, EvalTask):
            return pb.WaitTaskResponse(task=convert.eval_task_to_proto(outcome.task, outcome.header))
        return pb.WaitTaskResponse(task=convert.task_to_proto(outcome.task, outcome.header))

    async def _next_task(self, worker_id: str, timeout: float) -> IssuedTask | str:
        """The long poll: this worker's task, "done", "stopped", or "idle" after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    change = self._changes.current()  # taken before asking: a change after the answer sets it
                    outcome = self.driver.poll_task(worker_id)
                    if outcome is not None:
                        return outcome
                    await change.wait()
        except TimeoutError:
            return "idle"

    # Besides the header message it yields data messages serialized already (codec.data_frames), which the
    # generated base class cannot say; its serializer, codec.serialize (`register`), takes both.
    async def DownloadWeights(  # type: ignore[override]
        self, request: pb.DownloadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WeightsChunk | bytes]:
        worker_id = await self._worker(request.session_id, context)
        payload, issued = self.driver.weights_for(worker_id, request.task_id)
        task = issued.task
        header = pb.WeightsChunk(header=convert.header_to_proto(issued.header, round_index=task.round, task_id=task.task_id, parts=task.receives))
        sent = header.ByteSize()
        yield header
        for frame in codec.data_frames(payload, self.cfg.chunk_size):
            sent += len(frame)
            yield frame  # serialized already (`register` gives this method codec.serialize)
        # Reached only when the client drained the stream: count the transfer now, not when it started.
        self.metrics.wire_bytes.labels("down").inc(sent)
        try:
            self.driver.download_complete(worker_id, request.task_id)
        except FeddiffError as e:
            log.info("download of %s completed after its round closed: %s", request.task_id, e)

    async def UploadUpdate(self, request_iterator: AsyncIterator[pb.UpdateChunk | DataChunk], context: grpc.aio.ServicerContext) -> pb.UploadResponse:
        first = await self._first_message(request_iterator, context)
        h = first.header
        worker_id = await self._worker(h.session_id, context, counted=True)
        self.metrics.wire_bytes.labels("up").inc(first.ByteSize())
        try:
            bounds.check(h, HeaderError)
            parts = convert.parts_from_proto(h.stream.parts)
            limit = self.driver.upload_limit(worker_id, h.stream.task_id, parts, h.stream.round)
            stream_header = convert.header_from_proto(h.stream)
            stream_header.check(max_bytes=limit)
        except FeddiffError as e:
            await self._refuse(context, e)
        try:
            with self._uploads.open(worker_id, h.session_id, h.stream.task_id) as upload:
                await self._receive_and_accept(upload, h, stream_header, limit, request_iterator)
        except asyncio.CancelledError:  # the worker's end of the call is gone
            self._cut_off(worker_id, h.stream.task_id)
            raise
        except FeddiffError as e:
            if context.cancelled():  # it ended early because its connection did
                self._cut_off(worker_id, h.stream.task_id)
                return pb.UploadResponse(outcome=UploadAborted.reason)
            await self._refuse(context, e)
        self.metrics.updates.labels("accepted").inc()
        return pb.UploadResponse(outcome="accepted")

    async def _first_message(self, request_iterator: AsyncIterator[pb.UpdateChunk | DataChunk], context: grpc.aio.ServicerContext) -> pb.UpdateChunk:
        """The stream's header, within the idle timeout."""
        idle = self.cfg.upload_idle_timeout
        first = None
        try:
            async with asyncio.timeout(idle):
                first = await anext(aiter(request_iterator), None)
        except TimeoutError:
            await self._refuse(context, UploadStalled(f"upload stream sent no header for {idle:g} s (upload_idle_timeout): cut off"))
        if not isinstance(first, pb.UpdateChunk) or not first.HasField("header"):  # None, or data first
            await self._refuse(context, HeaderError("an update stream must start with its header"))
        return first

    @asynccontextmanager
    async def _upload_slot(self, upload: OpenUpload) -> AsyncIterator[ReceiveBuffer]:
        """Back-pressure: at most `max_concurrent_uploads` updates are buffered and decoded at once; the
        others wait here, unread (held by HTTP/2 flow control, each at most the stream window of
        server.GRPC_OPTIONS), until a slot is free or their round closes."""
        async with upload.bounded():
            await self._upload_slots.acquire()
        buffer = self._receive_buffers.pop() if self._receive_buffers else ReceiveBuffer()
        try:
            yield buffer
        finally:
            self._receive_buffers.append(buffer)
            self._upload_slots.release()

    async def _receive_and_accept(
        self,
        upload: OpenUpload,
        h: pb.UpdateHeader,
        header: StreamHeader,
        limit: int,
        request_iterator: AsyncIterator[pb.UpdateChunk | DataChunk],
    ) -> None:
        on_wire = self.metrics.wire_bytes.labels("up").inc
        refusal = SizeMismatch("an update stream carries one header, then data only")
        async with self._upload_slot(upload) as slot:
            with Reassembler(header, max_bytes=limit, into=slot) as receiver:
                async with upload.bounded(idle=self.cfg.upload_idle_timeout):
                    async for msg in request_iterator:
                        upload.progress()
                        receiver.feed(convert.data_in(msg, on_wire=on_wire, refusal=refusal))
                    if receiver.received < header.total_bytes:
                        await asyncio.sleep(CANCELLED_CALL_GRACE)  # cancelled meanwhile: `aborted`, not `bad_size`

                def accept() -> None:  # nothing refers to the slot's memory once it returns
                    payload = receiver.finish()
                    self.driver.accept(upload.worker_id, upload.task_id, payload, mean_loss=h.report.mean_loss, images_seen=h.report.images_seen)

                if header.total_bytes <= ACCEPT_ON_LOOP_MAX:
                    accept()
                else:
                    await run_to_end(self._accept_threads, accept)

    def _cut_off(self, worker_id: str, task_id: str) -> None:
        """An upload whose connection ended mid-stream (worker killed, link cut): dropped, and counted."""
        self.metrics.updates.labels(UploadAborted.reason).inc()
        log.warning("upload from worker %s for task %s was cut off mid-stream; dropped", worker_id, task_id)

    async def ReportEvaluation(self, request: pb.EvaluationReport, context: grpc.aio.ServicerContext) -> pb.EvaluationAck:
        worker_id = await self._worker(request.session_id, context)
        self.driver.report_evaluation(
            worker_id, request.task_id, request.frechet_distance, request.feature_extractor, request.num_samples, request.sample_grid_png
        )
        return pb.EvaluationAck()

    async def RejectTask(self, request: pb.RejectTaskRequest, context: grpc.aio.ServicerContext) -> pb.RejectTaskResponse:
        worker_id = await self._worker(request.session_id, context)
        refusal = self.driver.reject(worker_id, request.task_id, request.reason, request.message)
        self.metrics.updates.labels(refusal.outcome).inc()
        return pb.RejectTaskResponse()

    def check_request(self, request: Message) -> None:
        """The edge of every call that does not check its own request (`SELF_CHECKED`): its session looked up
        first (UnknownWorker: a caller without one learns nothing more), then every field against the wire
        contract's bounds (FieldOutOfRange, naming the field)."""
        session_id = getattr(request, "session_id", None)  # a field of every request but a join's and the tools'
        if session_id is not None:
            self.registry.check_session(session_id)
        bounds.check(request, FieldOutOfRange)

    # --- tools -----------------------------------------------------------------------------------------------
    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        fed = self.driver.federation
        ledger = fed.ledger
        progress = self.driver.progress()
        down, up = self.driver.bytes_total()
        listed, omitted, connected = self.registry.listing(bounds.MAX_STATUS_WORKERS)  # a bounded reply
        workers = [
            pb.WorkerStatus(
                worker_id=r.worker_id,
                connected=self.registry.is_connected(r),
                num_examples=r.info.num_examples,
                device=r.info.device,
                gpu_name=r.info.gpu_name,
                last_seen_seconds_ago=self.registry.seconds_since_seen(r),
            )
            for r in listed
        ]
        scored = {"global", *(r.worker_id for r in listed)}
        return pb.StatusResponse(
            state=self.driver.state,
            completed_rounds=fed.completed_rounds,
            rounds=fed.config.rounds,
            strategy=fed.config.strategy.value,
            model=fed.config.model,
            workers=workers,
            round_selected=progress.selected,
            round_done=progress.done,
            payload_bytes_down=down,
            payload_bytes_up=up,
            parameters_exchanged=ledger.traffic.total,
            full_fedavg_parameters=ledger.full_fedavg,
            reduction_vs_full=ledger.reduction_vs_full,
            frechet_distance={model: fd for model, fd in self.driver.last_fd.items() if model in scored},
            error=self.driver.failure,
            workers_omitted=omitted,
            workers_connected=connected,
        )


SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"]
# Calls that check their own request at the edge, counting refusals in their own metric: a join's WorkerInfo
# (feddiff_joins_total), an update's header (feddiff_updates_total).
SELF_CHECKED = frozenset({"Join", "UploadUpdate"})
# The weights streams read and write their data messages with the chunk codec (no protobuf copies).
_DESERIALIZERS = {"UploadUpdate": codec.parser(pb.UpdateChunk)}
_SERIALIZERS = {"DownloadWeights": codec.serialize}
_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def mapped(handler: Callable, metrics: Metrics, check: Callable[[Message], None] | None = None) -> Callable:
    """`handler` with every domain error it raises, wherever it raises it, ended with its mapped status code
    (coordinator/status.py) and counted in feddiff_refusals_total, instead of UNKNOWN and a traceback in the
    log; its request first passed to `check`. (Join and UploadUpdate count their refusals in
    feddiff_joins_total and feddiff_updates_total.)"""
    name = handler.__name__

    async def refuse(context: grpc.aio.ServicerContext, error: FeddiffError) -> NoReturn:
        metrics.refusals.labels(name, error.reason).inc()
        log.info("%s refused: %s: %s", name, error.reason, error)
        await abort(context, error)

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(request: Message, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            try:
                if check is not None:
                    check(request)
                async for response in handler(request, context):
                    yield response
            except FeddiffError as e:
                await refuse(context, e)

        return stream

    @functools.wraps(handler)
    async def unary(request: Message, context: grpc.aio.ServicerContext) -> object:
        try:
            if check is not None:
                check(request)
            return await handler(request, context)
        except FeddiffError as e:
            await refuse(context, e)

    return unary


def register(servicer: CoordinatorServicer, server: grpc.aio.Server) -> None:
    """Serve the Coordinator service's methods as the generated `add_CoordinatorServicer_to_server` does,
    with the chunk codec on the weights streams, every request checked at the edge and every method's domain
    errors mapped (`mapped`)."""
    handlers = {}
    for method in SERVICE.methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        handlers[method.name] = _HANDLERS[method.client_streaming, method.server_streaming](
            mapped(getattr(servicer, method.name), servicer.metrics, None if method.name in SELF_CHECKED else servicer.check_request),
            request_deserializer=_DESERIALIZERS.get(method.name, request.FromString),
            response_serializer=_SERIALIZERS.get(method.name, response.SerializeToString),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
