"""gRPC servicer on the asyncio server: each call's request checked at the edge (bounds, the session and the
caller's identity), one call into its handler (coordinator/handlers.py), its refusals mapped to status codes
(coordinator/status.py) and counted. Handlers run on the server's event loop and never block it: a long poll
awaits the phase's next change (coordinator/polls.py), and a large update is checked and folded in an accept
thread. Streams are bounded, one per worker each way, cut off when they stall or when their round closes
(coordinator/uploads.py, coordinator/downloads.py)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn

import grpc
from google.protobuf.message import Message

from coordinator.config import CoordinatorConfig
from coordinator.downloads import OpenDownloads, Unsendable
from coordinator.handlers import Handlers
from coordinator.log_limit import LimitedLog
from coordinator.metrics import Metrics
from coordinator.polls import LongPolls
from coordinator.registry import WorkerRegistry
from coordinator.rounds import RoundDriver
from coordinator.security import Authenticator
from coordinator.status import abort
from fedcore.errors import FeddiffError, FieldOutOfRange, UploadAborted
from fedcore.wire import bounds, frames
from fedcore.wire.frames import DataChunk
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2_grpc as pb_grpc

log = logging.getLogger("feddiff.coordinator")


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Create it on the event loop that serves it."""

    def __init__(self, cfg: CoordinatorConfig, driver: RoundDriver, registry: WorkerRegistry, metrics: Metrics, auth: Authenticator, *, run_id: str):
        self.cfg = cfg
        self.auth = auth
        self.metrics = metrics
        self.handlers = Handlers(cfg, driver, registry, metrics, run_id=run_id)
        self.refusal_log = LimitedLog(log)  # a flood of bad joins or updates is counted in full, logged in part
        loop = asyncio.get_running_loop()
        phase = driver.phase  # its changes answer long polls and end the streams of a round that closed
        self._polls = LongPolls(phase.poll_task, loop)
        self._downloads = OpenDownloads(cfg.download_idle_timeout, cfg.chunk_size)
        end_uploads = functools.partial(self.handlers.uploads.end_closed, phase.accepting)
        end_downloads = functools.partial(self._downloads.end_closed, phase.accepting)
        self._unsubscribe = [
            phase.on_change(self._polls.changes.notify),
            phase.on_change(lambda: loop.call_soon_threadsafe(end_uploads)),
            phase.on_change(lambda: loop.call_soon_threadsafe(end_downloads)),
        ]

    def close(self) -> None:
        """Stop hearing of the phase's changes (the event loop is about to close); end the accept threads."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self.handlers.close()

    def _worker(self, session_id: str, context: grpc.aio.ServicerContext) -> str:
        """The worker behind a session, checked against the caller's verified identity, else UnknownWorker."""
        worker_id = self.handlers.worker_of(session_id)
        self.auth.check(context, worker_id)
        return worker_id

    # --- membership ------------------------------------------------------------------------------------------
    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinResponse:
        """A session for a checked, verified worker; refusals counted in feddiff_joins_total."""
        response = await self.handlers.join(request.worker, verify=functools.partial(self.auth.check, context))
        self.metrics.joins.labels("accepted").inc()
        self._polls.end_sessions_of(request.worker.worker_id, but=response.session_id)
        return response

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        """The worker is alive; the answer says how many rounds are complete."""
        self._worker(request.session_id, context)
        return self.handlers.heartbeat()

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.LeaveResponse:
        """The worker ends its session."""
        self._worker(request.session_id, context)
        response = self.handlers.leave(request.session_id)
        self._polls.end_session(request.session_id)
        return response

    # --- tasks -----------------------------------------------------------------------------------------------
    async def WaitTask(self, request: pb.WaitTaskRequest, context: grpc.aio.ServicerContext) -> pb.WaitTaskResponse:
        """The long poll: the worker's next task, Done once the run is over, or Idle after its timeout."""
        worker_id = self._worker(request.session_id, context)
        outcome = await self._polls.next_task(worker_id, request.session_id, request.timeout_ms)
        self.handlers.worker_of(request.session_id)  # UnknownWorker when the session ended meanwhile (a restart)
        return self.handlers.task_response(outcome)

    # Besides the header message it writes data messages serialized already (frames.data_frames), which the
    # generated base class cannot say; its serializer, frames.serialize (`register`), takes both.
    async def DownloadWeights(self, request: pb.DownloadRequest, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        """The payload of the worker's task: its header, then the payload in chunks (coordinator/downloads.py);
        counted once drained. One that cannot end with a status ends without (`mapped`)."""
        worker_id = self._worker(request.session_id, context)
        header, payload = self.handlers.task_payload(worker_id, request.task_id)
        sent = await self._downloads.send(context, worker_id, request.session_id, request.task_id, header, payload)
        self.metrics.wire_bytes.labels("down").inc(sent)  # reached only when the worker drained the stream
        self.handlers.download_complete(worker_id, request.task_id)

    async def UploadUpdate(self, request_iterator: AsyncIterator[pb.UpdateChunk | DataChunk], context: grpc.aio.ServicerContext) -> pb.UploadResponse:
        """An update: its header checked against the worker's task, then its stream received and folded in."""
        return await self.handlers.upload(request_iterator, verify=functools.partial(self.auth.check, context), cancelled=context.cancelled)

    async def ReportEvaluation(self, request: pb.EvaluationReport, context: grpc.aio.ServicerContext) -> pb.EvaluationAck:
        """A worker's evaluation of its own model, for its evaluate task."""
        worker_id = self._worker(request.session_id, context)
        self.handlers.report_evaluation(worker_id, request)
        return pb.EvaluationAck()

    async def RejectTask(self, request: pb.RejectTaskRequest, context: grpc.aio.ServicerContext) -> pb.RejectTaskResponse:
        """A task the worker cannot run, with its reason; counted in feddiff_updates_total as rejected_<reason>."""
        worker_id = self._worker(request.session_id, context)
        refusal = self.handlers.reject_task(worker_id, request)
        self.metrics.updates.labels(refusal.outcome).inc()
        return pb.RejectTaskResponse()

    def check_request(self, request: Message) -> None:
        """The edge of every call that does not check its own request (`SELF_CHECKED`): its session looked up
        first (UnknownWorker: a caller without one learns nothing more), then every field against the wire
        contract's bounds (FieldOutOfRange, naming the field)."""
        session_id = getattr(request, "session_id", None)  # a field of every request but a join's and the tools'
        if session_id is not None:
            self.handlers.check_session(session_id)
        bounds.check(request, FieldOutOfRange)

    # --- tools -----------------------------------------------------------------------------------------------
    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        """The run's progress, for `feddiff status`: to the operator (`Authenticator.check_status`)."""
        self.auth.check_status(context)
        return self.handlers.status()


SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"]
# Calls that check their own request at the edge: a join's WorkerInfo, an update's header.
SELF_CHECKED = frozenset({"Join", "UploadUpdate"})
# The weights streams read and write their data messages with the chunk frames (no protobuf copies).
_DESERIALIZERS = {"UploadUpdate": frames.parser(pb.UpdateChunk)}
_SERIALIZERS = {"DownloadWeights": frames.serialize}
_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def mapped(handler: Callable, refuse: Refuse, check: Callable[[Message], None] | None = None) -> Callable:
    """`handler` with every domain error it raises, wherever it raises it, refused by `refuse` (`refusal`:
    counted, logged, ended with its mapped status code, coordinator/status.py) instead of ending in UNKNOWN and
    a traceback in the log; its request first passed to `check`. A download ended while its worker reads
    nothing (Unsendable) is refused alike, and its call ends without a status, which could not be sent."""
    checked = check or (lambda request: None)
    if inspect.isasyncgenfunction(handler):
        return _mapped_stream(handler, checked, refuse)
    return _mapped_unary(handler, checked, refuse)


Refuse = Callable[[grpc.aio.ServicerContext, FeddiffError | Unsendable, object], Awaitable[NoReturn]]


def refusal(rpc: str, metrics: Metrics, limited: LimitedLog) -> Refuse:
    """How `rpc` refuses a call (given its request): counted by reason, in feddiff_joins_total for a join, in
    feddiff_updates_total for an update, else in feddiff_refusals_total by RPC; logged, a join's or an update's
    as a warning limited per reason (`limited`), any other's at info; ended with the error's status code (or,
    Unsendable, cancelled without one). An update cut off on the way (UploadAborted) is logged as such."""
    own = {"Join": metrics.joins, "UploadUpdate": metrics.updates}.get(rpc)

    def count(reason: str) -> None:
        (metrics.refusals.labels(rpc, reason) if own is None else own.labels(reason)).inc()

    async def refuse(context: grpc.aio.ServicerContext, error: FeddiffError | Unsendable, request: object) -> NoReturn:
        if isinstance(error, Unsendable):
            count(error.error.reason)
            log.info("%s ended unread: %s: %s", rpc, error.error.reason, error.error)
            raise asyncio.CancelledError from None
        count(error.reason)
        if isinstance(error, UploadAborted):
            limited.refused(error.reason, "upload cut off (%s): %s", error.reason, error)
        elif own is None:
            log.info("%s refused: %s: %s", rpc, error.reason, error)
        else:
            what = f"join of {request.worker.worker_id[:140]!r}" if isinstance(request, pb.JoinRequest) else "update"
            limited.refused(error.reason, "%s refused: %s: %s", what, error.reason, error)
        await abort(context, error)

    return refuse


def _mapped_unary(handler: Callable, check: Callable[[Message], None], refuse: Refuse) -> Callable:
    @functools.wraps(handler)
    async def unary(request: Message, context: grpc.aio.ServicerContext) -> object:
        try:
            check(request)
            return await handler(request, context)
        except (FeddiffError, Unsendable) as e:
            await refuse(context, e, request)

    return unary


def _mapped_stream(handler: Callable, check: Callable[[Message], None], refuse: Refuse) -> Callable:
    @functools.wraps(handler)
    async def stream(request: Message, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
        try:
            check(request)
            async for response in handler(request, context):
                yield response
        except (FeddiffError, Unsendable) as e:
            await refuse(context, e, request)

    return stream


def register(servicer: CoordinatorServicer, server: grpc.aio.Server) -> None:
    """Serve the Coordinator service's methods as the generated `add_CoordinatorServicer_to_server` does,
    with the chunk frames on the weights streams, every request checked at the edge and every method's domain
    errors refused in one way (`mapped`, `refusal`)."""
    handlers = {}
    for method in SERVICE.methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        handlers[method.name] = _HANDLERS[method.client_streaming, method.server_streaming](
            mapped(
                getattr(servicer, method.name),
                refusal(method.name, servicer.metrics, servicer.refusal_log),
                None if method.name in SELF_CHECKED else servicer.check_request,
            ),
            request_deserializer=_DESERIALIZERS.get(method.name, request.FromString),
            response_serializer=_SERIALIZERS.get(method.name, response.SerializeToString),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
