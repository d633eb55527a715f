"""Protobuf <-> domain objects for the v1 wire contract, with range checks, and chunked streams of messages."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar, overload

from fedcore import settings
from fedcore.errors import HeaderError, MalformedTask, SettingOutOfRange, SettingsError
from fedcore.federation.client import EvalTask, TrainTask
from fedcore.model.diffusion import SamplingSpec
from fedcore.model.parts import Part, parse_parts, sorted_parts
from fedcore.model.training import TrainConfig
from fedcore.payload.codecs import Codec, Identity
from fedcore.wire.bounds import WORKER_ID
from fedcore.wire.frames import ChunkMessage, data_message_size
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from fedcore.wire.stream import Reassembler, ReceiveBuffer, StreamHeader

T = TypeVar("T")


def valid_worker_id(worker_id: str) -> bool:
    """A worker identity: 1-128 ASCII letters, digits, '-', '_' or '.' (it names files and certificates)."""
    return WORKER_ID.problem(worker_id) is None


def parts_to_proto(parts: Iterable[Part]) -> list[str]:
    return [p.value for p in sorted_parts(parts)]


def parts_from_proto(names: Iterable[str]) -> frozenset[Part]:
    try:
        return parse_parts(list(names))
    except ValueError as e:
        raise HeaderError(str(e)) from None


def _task_message(kind: pb.Task.Kind.ValueType, task: TrainTask | EvalTask, header: StreamHeader, **spec: Any) -> pb.Task:
    """The envelope every task shares (round, id, parts, the payload's size and digest) around its `spec`."""
    msg = pb.Task(
        kind=kind,
        round=task.wire_round,
        task_id=task.task_id,
        receives=parts_to_proto(task.receives),
        private_parts=parts_to_proto(task.private_parts),
        payload_bytes=header.total_bytes,
        **spec,
    )
    setattr(msg, f"payload_{header.algorithm}", header.digest)  # the field of the header's digest
    return msg


def task_to_proto(task: TrainTask, header: StreamHeader) -> pb.Task:
    compression = "" if isinstance(task.codec, Identity) else task.codec.name  # a run without: as before
    train = pb.TrainSpec(
        epochs=task.train.epochs, batch_size=task.train.batch_size, lr=task.train.lr, loss=task.train.loss, seed=task.seed, compression=compression
    )
    return _task_message(pb.Task.TRAIN, task, header, returns=parts_to_proto(task.returns), train=train)


def task_from_proto(msg: pb.Task) -> TrainTask:
    """A train task as the worker will run it; out-of-range settings are refused (`fedcore.settings`), not
    clamped."""
    spec = msg.train
    train = _checked(TrainConfig, msg.task_id, {"epochs": spec.epochs, "batch_size": spec.batch_size, "lr": spec.lr, "loss": spec.loss})
    receives, returns = _task_parts(msg.task_id, msg.receives), _task_parts(msg.task_id, msg.returns)
    if not receives or not returns <= receives:
        raise MalformedTask(f"task {msg.task_id!r}: returns {list(msg.returns)} must be part of receives {list(msg.receives)}")
    return TrainTask(
        round_index=msg.round,
        task_id=msg.task_id,
        receives=receives,
        returns=returns,
        private_parts=_task_parts(msg.task_id, msg.private_parts),
        train=train,
        seed=spec.seed,
        codec=_task_codec(msg.task_id, spec.compression),
    )


def _task_codec(task_id: str, name: str) -> Codec:
    """The codec a task names (empty: none); MalformedTask for one this version does not know."""
    try:
        return Codec.parse(name or "none")
    except ValueError as e:
        raise MalformedTask(f"task {task_id!r}: {e}") from None


def _checked(cls: type[T], task_id: str, values: dict[str, object]) -> T:
    try:
        return settings.build(cls, values)
    except SettingsError as e:
        raise SettingOutOfRange(f"task {task_id!r}: {e}") from None


def _task_parts(task_id: str, names: Iterable[str]) -> frozenset[Part]:
    try:
        return parse_parts(list(names))
    except ValueError as e:
        raise MalformedTask(f"task {task_id!r}: {e}") from None


def eval_task_to_proto(task: EvalTask, header: StreamHeader) -> pb.Task:
    spec = task.spec
    evaluate = pb.EvalSpec(sampler=spec.sampler, steps=spec.steps, num_samples=spec.num_samples, seed=spec.seed, share_samples=task.share_samples)
    return _task_message(pb.Task.EVALUATE, task, header, eval=evaluate)


def eval_task_from_proto(msg: pb.Task) -> EvalTask:
    spec = msg.eval
    sampling = _checked(SamplingSpec, msg.task_id, {"num_samples": spec.num_samples, "sampler": spec.sampler, "steps": spec.steps, "seed": spec.seed})
    receives = _task_parts(msg.task_id, msg.receives)
    if not receives:
        raise MalformedTask(f"task {msg.task_id!r}: an evaluate task receives at least one part")
    return EvalTask(
        completed_rounds=msg.round,
        task_id=msg.task_id,
        receives=receives,
        private_parts=_task_parts(msg.task_id, msg.private_parts),
        spec=sampling,
        share_samples=spec.share_samples,
    )


def any_task_from_proto(msg: pb.Task) -> TrainTask | EvalTask:
    """A task as the worker will run it, or TaskRefused saying why it cannot."""
    if msg.kind == pb.Task.TRAIN:
        return task_from_proto(msg)
    if msg.kind == pb.Task.EVALUATE:
        return eval_task_from_proto(msg)
    raise MalformedTask(f"task {msg.task_id!r} has unknown kind {msg.kind}")


def header_to_proto(header: StreamHeader, *, wire_round: int, task_id: str, parts: Iterable[Part]) -> pb.StreamHeader:
    return pb.StreamHeader(
        round=wire_round,
        task_id=task_id,
        parts=parts_to_proto(parts),
        total_bytes=header.total_bytes,
        format_version=header.format_version,
        **{header.algorithm: header.digest},
    )


def header_from_proto(msg: pb.StreamHeader) -> StreamHeader:
    """The header's one digest: BLAKE3 when set, else SHA-256 (a header with both is refused)."""
    if msg.blake3 and msg.sha256:
        raise HeaderError("a stream header carries one digest, blake3 or sha256, not both")
    algorithm = "blake3" if msg.blake3 else "sha256"
    return StreamHeader(total_bytes=msg.total_bytes, digest=getattr(msg, algorithm), algorithm=algorithm, format_version=msg.format_version)


def data_in(msg: ChunkMessage, *, on_wire: Callable[[int], None], refusal: Exception) -> bytes | memoryview:
    """The data of one message of a stream after its header (a protobuf message or a
    `frames.DataChunk`), its serialized size given to `on_wire`; a message that is not data raises
    `refusal`."""
    if msg.WhichOneof("msg") != "data":
        on_wire(msg.ByteSize())
        raise refusal
    data = msg.data  # from a protobuf message, a copy each time it is read: once
    on_wire(data_message_size(len(data)))
    return data


def data_of(messages: Iterable[ChunkMessage], *, on_wire: Callable[[int], None], refusal: Exception) -> Iterator[bytes | memoryview]:
    """`data_in` of each of a stream's messages after its header."""
    for msg in messages:
        yield data_in(msg, on_wire=on_wire, refusal=refusal)


@overload
def reassemble(
    header: StreamHeader,
    data_messages: Iterable[bytes | memoryview],
    *,
    max_bytes: int,
    on_bytes: Callable[[int], None] | None = None,
    into: ReceiveBuffer,
) -> memoryview: ...
@overload
def reassemble(
    header: StreamHeader,
    data_messages: Iterable[bytes | memoryview],
    *,
    max_bytes: int,
    on_bytes: Callable[[int], None] | None = None,
    into: None = None,
) -> bytearray: ...
def reassemble(
    header: StreamHeader,
    data_messages: Iterable[bytes | memoryview],
    *,
    max_bytes: int,
    on_bytes: Callable[[int], None] | None = None,
    into: ReceiveBuffer | None = None,
) -> bytearray | memoryview:
    """Feed the data of a stream's messages into a checked buffer (a fresh bytearray, or a view of the memory of
    `into`): refuses excess at once, then checks size and hash."""
    with Reassembler(header, max_bytes=max_bytes, into=into) as receiver:
        for data in data_messages:
            if on_bytes is not None:
                on_bytes(len(data))
            receiver.feed(data)
        return receiver.finish()
