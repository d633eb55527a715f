"""What each call of the Coordinator service does, in the run's terms: protobuf in, one call into the phase in
progress (coordinator/phase.py) or the worker registry, protobuf out; an update's stream read into an upload
slot (coordinator/uploads.py) on the way. Refusals are raised as domain errors (fedcore.errors) and mapped to
status codes by the servicer (coordinator/status.py); nothing here knows gRPC's call context. Called on the
server's event loop: what could hold it (a join's task replaced, its payload hashed, a large update folded in)
runs in a thread."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable

from coordinator.config import CoordinatorConfig
from coordinator.evaluation import EvalReport
from coordinator.metrics import Metrics
from coordinator.phase import IssuedTask, PollEnd, PollOutcome
from coordinator.refusals import Refusal
from coordinator.registry import WorkerInfo, WorkerRecord, WorkerRegistry
from coordinator.rounds import RoundDriver
from coordinator.uploads import OpenUploads, UploadReceiver
from fedcore.errors import BadWorkerInfo, FeddiffError, HeaderError, UploadAborted, UploadStalled
from fedcore.federation.client import EvalTask
from fedcore.wire import bounds, convert
from fedcore.wire.frames import DataChunk
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from fedcore.wire.stream import DIGESTS, LEGACY_DIGEST, StreamHeader

log = logging.getLogger("feddiff.coordinator")


class Handlers:
    """The Coordinator service's calls, each given its checked request and the worker behind its session."""

    def __init__(self, cfg: CoordinatorConfig, driver: RoundDriver, registry: WorkerRegistry, metrics: Metrics, *, run_id: str):
        self.cfg = cfg
        self.run_id = run_id  # sent at every join: a worker keeps its private parts for one run
        self.driver = driver  # the run's federation and latest FDs
        self.phase = driver.phase  # the tasks of the phase in progress, and the run's state
        self.registry = registry
        self.metrics = metrics  # an update's bytes on the wire and how it ended (its refusals: the servicer's)
        self.uploads = OpenUploads()  # the upload streams in progress, one per worker
        self.receiver = UploadReceiver(max(1, cfg.max_concurrent_uploads), cfg.upload_idle_timeout)

    def close(self) -> None:
        """End the accept threads (after the accepts in progress)."""
        self.receiver.close()

    # --- membership ------------------------------------------------------------------------------------------
    def check_session(self, session_id: str) -> None:
        """UnknownWorker for a session never issued, ended or forgotten (it is only looked up)."""
        self.registry.check_session(session_id)

    def worker_of(self, session_id: str) -> str:
        """The worker behind a session, marked as seen now; UnknownWorker for an unknown or ended session."""
        return self.registry.touch(session_id).worker_id

    async def join(self, w: pb.WorkerInfo, verify: Callable[[str], None]) -> pb.JoinResponse:
        """A session for a checked worker whose identity `verify` confirms, once a task of its that it could only
        fail is replaced; BadWorkerInfo (a field outside its bound), UnknownWorker (from `verify`),
        UnregisteredWorker or DuplicateWorker."""
        session = self._session(w, verify)
        # Before it hears of its session: a task it could only fail is replaced (hashing a payload, off the loop).
        await asyncio.get_running_loop().run_in_executor(None, self.phase.joined, w.worker_id)
        return self._join_response(session)

    def _session(self, w: pb.WorkerInfo, verify: Callable[[str], None]) -> str:
        """A new session for a checked and verified worker, admitted to the run (`join`)."""
        bounds.check(w, BadWorkerInfo)
        verify(w.worker_id)
        self.phase.admit(w.worker_id, w.num_examples)
        session, replaced = self.registry.join(worker_info(w))
        record = self.registry.record(w.worker_id)  # private state disowned when another installation took the id over
        again = ""
        if replaced is not None:
            again = " again, ending its earlier session" if replaced.info.instance_id == w.instance_id else " after a restart, ending its earlier session"
        if w.has_private_state and record is not None and not record.info.has_private_state:
            again += " from another installation than before, which holds none of its private parts"
        log.info("worker %s joined%s (%s%s, %d images)", w.worker_id, again, w.device, f" {w.gpu_name}" if w.gpu_name else "", w.num_examples)
        return session

    def _join_response(self, session_id: str) -> pb.JoinResponse:
        """What a joined worker learns: its session, the run, and how to talk to this coordinator."""
        fed = self.driver.federation.config
        return pb.JoinResponse(
            session_id=session_id,
            heartbeat_interval_ms=int(self.cfg.heartbeat_interval * 1000),
            model=fed.model,
            strategy=fed.strategy.value,
            chunk_size=self.cfg.chunk_size,
            rounds=fed.rounds,
            digests=sorted(set(DIGESTS) - {LEGACY_DIGEST}),
            run_id=self.run_id,
        )

    def heartbeat(self) -> pb.HeartbeatResponse:
        """The answer to a live worker: how many rounds are complete."""
        return pb.HeartbeatResponse(round=self.driver.federation.completed_rounds)

    def leave(self, session_id: str) -> pb.LeaveResponse:
        """The worker ends its session: a round with a quorum of updates in no longer waits for its task."""
        worker_id = self.registry.leave(session_id)
        if worker_id is not None:
            self.phase.left(worker_id)
        return pb.LeaveResponse()

    # --- tasks -----------------------------------------------------------------------------------------------
    def task_response(self, outcome: PollOutcome) -> pb.WaitTaskResponse:
        """A long poll's answer: the task issued, Done (the run is over, with its error if it failed), or Idle."""
        if outcome is PollEnd.DONE:
            return pb.WaitTaskResponse(done=pb.Done(rounds=self.driver.federation.completed_rounds, error=self.phase.failure))
        if not isinstance(outcome, IssuedTask):  # IDLE or STOPPED
            return pb.WaitTaskResponse(idle=pb.Idle())
        if isinstance(outcome.task, EvalTask):
            return pb.WaitTaskResponse(task=convert.eval_task_to_proto(outcome.task, outcome.header))
        return pb.WaitTaskResponse(task=convert.task_to_proto(outcome.task, outcome.header))

    def task_payload(self, worker_id: str, task_id: str) -> tuple[pb.WeightsChunk, bytes]:
        """The first message of a task's download (its stream header) and the payload that follows it."""
        payload, issued = self.phase.task_payload(worker_id, task_id)
        task = issued.task
        header = convert.header_to_proto(issued.header, wire_round=task.wire_round, task_id=task.task_id, parts=task.receives)
        return pb.WeightsChunk(header=header), payload

    def download_complete(self, worker_id: str, task_id: str) -> None:
        """A download drained by its worker: counted, unless its round closed meanwhile (logged)."""
        try:
            self.phase.download_complete(worker_id, task_id)
        except FeddiffError as e:
            log.info("download of %s completed after its round closed: %s", task_id, e)

    # --- updates ---------------------------------------------------------------------------------------------
    async def upload(
        self, messages: AsyncIterator[pb.UpdateChunk | DataChunk], verify: Callable[[str], None], cancelled: Callable[[], bool]
    ) -> pb.UploadResponse:
        """An update stream: its header (`_first_message`), from the worker behind its session, whose identity
        `verify` confirms; the header checked against the worker's task (`update_header`); then its data
        received into an upload slot and folded in (`accept`). Answered "accepted", or "aborted" when its
        connection ended on the way (`cancelled`); a refusal of the header, the stream or the update raised."""
        worker_id, h = await self._first_message(messages, verify)
        header, limit = self.update_header(worker_id, h)
        if not await self._receive(worker_id, h, header, limit, messages, cancelled):
            return pb.UploadResponse(outcome=UploadAborted.reason)
        self.metrics.updates.labels("accepted").inc()
        return pb.UploadResponse(outcome="accepted")

    async def _first_message(self, messages: AsyncIterator[pb.UpdateChunk | DataChunk], verify: Callable[[str], None]) -> tuple[str, pb.UpdateHeader]:
        """The stream's first message, its header, within the idle timeout (else UploadStalled; HeaderError when
        it is not a header); and the worker behind the session it names, verified (UnknownWorker)."""
        idle = self.cfg.upload_idle_timeout
        try:
            async with asyncio.timeout(idle):
                first = await anext(aiter(messages), None)
        except TimeoutError:
            raise UploadStalled(f"upload stream sent no header for {idle:g} s (upload_idle_timeout): cut off") from None
        if not isinstance(first, pb.UpdateChunk) or not first.HasField("header"):  # None, or data first
            raise HeaderError("an update stream must start with its header")
        worker_id = self.worker_of(first.header.session_id)
        verify(worker_id)
        self.metrics.wire_bytes.labels("up").inc(first.ByteSize())
        return worker_id, first.header

    def update_header(self, worker_id: str, h: pb.UpdateHeader) -> tuple[StreamHeader, int]:
        """An update's stream header and the most bytes its payload may take, once the header is checked against
        the wire contract (HeaderError) and against the worker's task: its round, its parts and the size they
        bound (WrongRound, NotAssigned, DuplicateUpdate, LateUpdate, StreamTooLong)."""
        bounds.check(h, HeaderError)
        self.phase.note_training_time(worker_id, h.stream.task_id, h.report.seconds)
        parts = convert.parts_from_proto(h.stream.parts)
        limit = self.phase.upload_limit(worker_id, h.stream.task_id, parts, h.stream.round)
        header = convert.header_from_proto(h.stream)
        header.check(max_bytes=limit)
        return header, limit

    async def _receive(
        self,
        worker_id: str,
        h: pb.UpdateHeader,
        header: StreamHeader,
        limit: int,
        messages: AsyncIterator[pb.UpdateChunk | DataChunk],
        cancelled: Callable[[], bool],
    ) -> bool:
        """Receive an update's stream into an upload slot and fold it in: True, or False when its connection
        ended on the way (counted as cut off); a refusal of the stream or the update raised."""
        try:
            with self.uploads.open(worker_id, h.session_id, h.stream.task_id) as upload:
                on_wire = self.metrics.wire_bytes.labels("up").inc
                accept = functools.partial(self.accept, worker_id, h)
                await self.receiver.receive(upload, header, limit, messages, on_wire=on_wire, accept=accept)
                return True
        except asyncio.CancelledError:  # the worker's end of the call is gone
            self._cut_off(worker_id, h.stream.task_id)
            raise
        except FeddiffError:
            if not cancelled():
                raise
            self._cut_off(worker_id, h.stream.task_id)  # it ended early because its connection did
            return False

    def _cut_off(self, worker_id: str, task_id: str) -> None:
        """An upload whose connection ended mid-stream (worker killed, link cut): dropped, and counted."""
        self.metrics.updates.labels(UploadAborted.reason).inc()
        log.warning("upload from worker %s for task %s was cut off mid-stream; dropped", worker_id, task_id)

    def accept(self, worker_id: str, h: pb.UpdateHeader, payload: bytes | bytearray | memoryview) -> None:
        """Fold a received update into its round (its payload and report checked first)."""
        self.phase.accept(worker_id, h.stream.task_id, payload, mean_loss=h.report.mean_loss, images_seen=h.report.images_seen)

    def report_evaluation(self, worker_id: str, r: pb.EvaluationReport) -> None:
        """Record a worker's evaluation of its own model (and the sample grid it shares, if any)."""
        report = EvalReport(worker_id, r.task_id, r.round, r.frechet_distance, r.feature_extractor, r.num_samples)
        self.phase.report_evaluation(report, r.sample_grid_png)

    def reject_task(self, worker_id: str, r: pb.RejectTaskRequest) -> Refusal:
        """A task its worker cannot run: not given to it again in this attempt."""
        return self.phase.reject(worker_id, r.task_id, r.reason, r.message)

    # --- tools -----------------------------------------------------------------------------------------------
    def status(self) -> pb.StatusResponse:
        """The run's progress for `feddiff status`: a bounded listing of the workers, and the run's totals."""
        fed = self.driver.federation
        ledger = fed.ledger
        progress = self.phase.progress()
        down, up = self.phase.bytes_total()
        listed, omitted, connected = self.registry.listing(bounds.MAX_STATUS_WORKERS)  # a bounded reply
        scored = {"global", *(r.worker_id for r in listed)}
        return pb.StatusResponse(
            state=self.phase.state,
            completed_rounds=fed.completed_rounds,
            rounds=fed.config.rounds,
            strategy=fed.config.strategy.value,
            model=fed.config.model,
            workers=[self._worker_status(r) for r in listed],
            round_selected=progress.selected,
            round_done=progress.done,
            payload_bytes_down=down,
            payload_bytes_up=up,
            parameters_exchanged=ledger.traffic.total,
            full_fedavg_parameters=ledger.full_fedavg,
            reduction_vs_full=ledger.reduction_vs_full,
            frechet_distance={model: fd for model, fd in self.driver.last_fd.items() if model in scored},
            error=self.phase.failure,
            workers_omitted=omitted,
            workers_connected=connected,
            run_id=self.run_id,
            compression=fed.config.compression.name,
        )

    def _worker_status(self, r: WorkerRecord) -> pb.WorkerStatus:
        return pb.WorkerStatus(
            worker_id=r.worker_id,
            connected=self.registry.is_connected(r),
            num_examples=r.info.num_examples,
            device=r.info.device,
            gpu_name=r.info.gpu_name,
            last_seen_seconds_ago=self.registry.seconds_since_seen(r),
        )


def worker_info(w: pb.WorkerInfo) -> WorkerInfo:
    """The registry's record of what a joining worker says of itself (digests: those this coordinator knows)."""
    return WorkerInfo(
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
