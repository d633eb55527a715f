"""The bound of every string and number of the v1 wire contract, and the check of a received message against
them. proto/feddiff/v1/feddiff.proto states each bound beside its field ("bound: ..."), as `describe` words
it; a test holds the two together and fails for a field without one.

The bounds here are static: what no honest peer ever sends. Checks that depend on the run (a task's round,
its payload size, the images a worker declared) come on top, where the run is known. A session id is not
checked here but looked up: one the coordinator did not issue, of any length, is UNAUTHENTICATED."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from fedcore.errors import FeddiffError, shortened
from fedcore.settings import MAX_BATCH, MAX_EPOCHS, MAX_EVAL_SAMPLES, MAX_SAMPLING_STEPS
from fedcore.wire.stream import MAX_CHUNK_SIZE

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
MAX_NUM_EXAMPLES = U32  # images one worker declares: its shard (the FedAvg weight, before the coordinator's bounds)
MAX_TASK_ID = 256  # "r<round>.<attempt>-<worker id>" with the longest worker id fits
MAX_SESSION_ID = 64  # the coordinator issues 32 hex digits
MAX_RUN_ID = 64  # the coordinator issues 32 hex digits
MAX_LABEL = 128  # device, GPU, software version, feature extractor, a model name
MAX_MESSAGE = 4096  # an explanation for the operator (a refused task, a failed run)
# A training loss, computed in float32: any finite one. Honest losses have no smaller bound: a global model
# ruined by a poisoned round gives its honest workers losses of any size, and refusing their reports would lock
# out exactly the workers that can repair it.
MAX_MEAN_LOSS = 3.4028234663852886e38  # float32's largest finite value
MAX_FRECHET_DISTANCE = 1e6
MAX_TRAIN_SECONDS = 1e7  # about 116 days
MAX_PAYLOAD_BYTES = 1 << 40
MAX_GRID_BYTES = MAX_CHUNK_SIZE  # a shared sample grid (PNG): its message fits the limit of one (MAX_MESSAGE_BYTES)
MAX_STATUS_WORKERS = 1000  # workers listed in one status reply; the rest are counted (workers_omitted)
MAX_PARTS = 3
MAX_CODEC_NAME = 64  # fedcore.payload.codecs.MAX_NAME
MAX_DIGESTS = 8

TextKind = Literal["printable", "id", "hex", "digest", "text"]
_ID = re.compile(r"[A-Za-z0-9._-]*")
_HEX = re.compile(r"[0-9a-f]*")
_DIGEST = re.compile(r"(?:[0-9a-f]{64})?")
_KIND_WORDS = {
    "printable": "printable characters",
    "id": "characters of [A-Za-z0-9._-]",
    "hex": "lowercase hex digits",
    "text": "characters, no control characters but newline and tab",
}


def _number_text(x: float) -> str:
    """2^64-1, 2^40, 1e+06, 1000, 0.5: the shortest exact spelling a reader checks at a glance."""
    if isinstance(x, int) and x >= 1 << 16:
        if (x + 1) & x == 0:
            return f"2^{(x + 1).bit_length() - 1}-1"
        if x & (x - 1) == 0:
            return f"2^{x.bit_length() - 1}"
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Text:
    least: int
    most: int  # characters
    kind: TextKind = "printable"

    def describe(self) -> str:
        if self.kind == "digest":
            return "empty or 64 lowercase hex digits"
        return f"{self.least}..{self.most} {_KIND_WORDS[self.kind]}"

    def problem(self, value: str) -> str | None:
        if not self.least <= len(value) <= self.most:
            return f"has {len(value)} characters"
        if self.kind == "id" and not _ID.fullmatch(value):
            return f"is {value[:40]!r}"
        if self.kind == "hex" and not _HEX.fullmatch(value):
            return f"is {value[:40]!r}"
        if self.kind == "digest" and not _DIGEST.fullmatch(value):
            return f"is {value[:80]!r}"
        if self.kind == "printable" and not value.isprintable():
            return f"holds a control character: {value[:40]!r}"
        if self.kind == "text" and not value.replace("\n", " ").replace("\t", " ").isprintable():
            return f"holds a control character: {value[:40]!r}"
        return None


@dataclass(frozen=True)
class Number:
    least: float
    most: float
    open_low: bool = False  # the bounds themselves are outside
    open_high: bool = False

    def describe(self) -> str:
        low, high = _number_text(self.least), _number_text(self.most)
        if isinstance(self.least, int) and isinstance(self.most, int):
            return f"{low}..{high}"
        return f"finite, {'(' if self.open_low else '['}{low}, {high}{')' if self.open_high else ']'}"

    def problem(self, value: float) -> str | None:
        above = value > self.least if self.open_low else value >= self.least
        below = value < self.most if self.open_high else value <= self.most
        if (isinstance(value, float) and not math.isfinite(value)) or not (above and below):
            return f"is {value!r}"
        return None


@dataclass(frozen=True)
class Blob:
    most: int  # bytes

    def describe(self) -> str:
        return f"at most {_number_text(self.most)} bytes"

    def problem(self, value: bytes) -> str | None:
        return f"has {len(value)} bytes" if len(value) > self.most else None


Scalar = Text | Number | Blob


@dataclass(frozen=True)
class Items:
    """A repeated field (or a map): at most `most` entries, each within `each` (messages: their own fields)."""

    most: int
    each: Scalar | None = None
    key: Text | None = None  # of a map

    def describe(self) -> str:
        words = f"at most {_number_text(self.most)} entries"
        if self.key is not None:
            words += f", keys {self.key.describe()}"
        if self.each is not None:
            words += f", {'values' if self.key is not None else 'each'} {self.each.describe()}"
        return words


Bound = Scalar | Items

WORKER_ID = Text(1, 128, "id")  # it names files and certificates
SESSION = Text(0, MAX_SESSION_ID, "id")  # looked up, not checked (`check`)
RUN_ID = Text(0, MAX_RUN_ID, "hex")
TASK_ID = Text(1, MAX_TASK_ID, "id")
LABEL = Text(0, MAX_LABEL)
DIGEST = Text(0, 64, "digest")
PARTS = Items(MAX_PARTS, Text(1, 16, "id"))
DIGEST_NAMES = Items(MAX_DIGESTS, Text(1, 16, "id"))
ROUND = Number(0, U32)
COUNT = Number(0, U64)

# Message.field -> bound, for every string, bytes and number field and every repeated field of the contract.
BOUNDS: Mapping[str, Bound] = {
    "WorkerInfo.worker_id": WORKER_ID,
    "WorkerInfo.device": Text(0, 64),
    "WorkerInfo.gpu_name": LABEL,
    "WorkerInfo.gpu_memory_bytes": Number(0, 1 << 50),
    "WorkerInfo.num_examples": Number(1, MAX_NUM_EXAMPLES),
    "WorkerInfo.software_version": LABEL,
    "WorkerInfo.digests": DIGEST_NAMES,
    "WorkerInfo.installation_id": Text(0, 128, "id"),
    "WorkerInfo.instance_id": Text(0, 128, "id"),
    "JoinResponse.session_id": Text(1, MAX_SESSION_ID, "id"),
    "JoinResponse.heartbeat_interval_ms": Number(0, U32),
    "JoinResponse.model": LABEL,
    "JoinResponse.strategy": Text(1, 16, "id"),
    "JoinResponse.chunk_size": Number(1, MAX_CHUNK_SIZE),
    "JoinResponse.rounds": Number(1, U32),
    "JoinResponse.digests": DIGEST_NAMES,
    # Empty from a coordinator that predates run ids; hex, as the worker names a folder by it
    "JoinResponse.run_id": RUN_ID,
    "HeartbeatRequest.session_id": SESSION,
    "HeartbeatResponse.round": ROUND,
    "LeaveRequest.session_id": SESSION,
    "TrainSpec.epochs": Number(1, MAX_EPOCHS),
    "TrainSpec.batch_size": Number(1, MAX_BATCH),
    "TrainSpec.lr": Number(0.0, 1.0, open_low=True, open_high=True),
    "TrainSpec.loss": Text(1, 16, "id"),
    "TrainSpec.seed": Number(0, U64),
    "TrainSpec.compression": Text(0, MAX_CODEC_NAME),
    "EvalSpec.sampler": Text(1, 16, "id"),
    "EvalSpec.steps": Number(1, MAX_SAMPLING_STEPS),
    "EvalSpec.num_samples": Number(1, MAX_EVAL_SAMPLES),
    "EvalSpec.seed": Number(0, U64),
    "Task.round": ROUND,
    "Task.task_id": TASK_ID,
    "Task.receives": PARTS,
    "Task.returns": PARTS,
    "Task.private_parts": PARTS,
    "Task.payload_bytes": Number(1, MAX_PAYLOAD_BYTES),
    "Task.payload_sha256": DIGEST,
    "Task.payload_blake3": DIGEST,
    "WaitTaskRequest.session_id": SESSION,
    "WaitTaskRequest.timeout_ms": Number(0, U32),
    "Done.rounds": ROUND,
    "Done.error": Text(0, MAX_MESSAGE, "text"),
    "DownloadRequest.session_id": SESSION,
    "DownloadRequest.task_id": TASK_ID,
    "StreamHeader.round": ROUND,
    "StreamHeader.task_id": TASK_ID,
    "StreamHeader.parts": PARTS,
    "StreamHeader.total_bytes": Number(1, U64),
    "StreamHeader.sha256": DIGEST,
    "StreamHeader.format_version": Number(1, U32),
    "StreamHeader.blake3": DIGEST,
    "WeightsChunk.data": Blob(MAX_CHUNK_SIZE),
    "TrainReport.images_seen": Number(1, 1 << 46),  # above MAX_EPOCHS x MAX_NUM_EXAMPLES; the run bounds it by epochs x num_examples
    "TrainReport.mean_loss": Number(0.0, MAX_MEAN_LOSS),
    "TrainReport.seconds": Number(0.0, MAX_TRAIN_SECONDS),
    "UpdateHeader.session_id": SESSION,
    "UpdateChunk.data": Blob(MAX_CHUNK_SIZE),
    "UploadResponse.outcome": Text(0, 32, "id"),
    "EvaluationReport.session_id": SESSION,
    "EvaluationReport.task_id": TASK_ID,
    "EvaluationReport.round": ROUND,
    "EvaluationReport.frechet_distance": Number(0.0, MAX_FRECHET_DISTANCE),
    "EvaluationReport.feature_extractor": LABEL,
    "EvaluationReport.num_samples": Number(0, MAX_EVAL_SAMPLES),
    "EvaluationReport.sample_grid_png": Blob(MAX_GRID_BYTES),
    "RejectTaskRequest.session_id": SESSION,
    "RejectTaskRequest.task_id": TASK_ID,
    "RejectTaskRequest.reason": Text(0, 32, "id"),
    "RejectTaskRequest.message": Text(0, MAX_MESSAGE, "text"),
    "WorkerStatus.worker_id": WORKER_ID,
    "WorkerStatus.num_examples": Number(0, MAX_NUM_EXAMPLES),
    "WorkerStatus.device": Text(0, 64),
    "WorkerStatus.gpu_name": LABEL,
    "WorkerStatus.last_seen_seconds_ago": Number(0.0, 1e12),
    "StatusResponse.state": Text(1, 32, "id"),
    "StatusResponse.completed_rounds": ROUND,
    "StatusResponse.rounds": ROUND,
    "StatusResponse.strategy": Text(1, 16, "id"),
    "StatusResponse.model": LABEL,
    "StatusResponse.workers": Items(MAX_STATUS_WORKERS),
    "StatusResponse.round_selected": ROUND,
    "StatusResponse.round_done": ROUND,
    "StatusResponse.payload_bytes_down": COUNT,
    "StatusResponse.payload_bytes_up": COUNT,
    "StatusResponse.parameters_exchanged": COUNT,
    "StatusResponse.full_fedavg_parameters": COUNT,
    "StatusResponse.reduction_vs_full": Number(0.0, 1.0),
    "StatusResponse.frechet_distance": Items(MAX_STATUS_WORKERS + 1, Number(0.0, MAX_FRECHET_DISTANCE), key=WORKER_ID),
    "StatusResponse.error": Text(0, MAX_MESSAGE, "text"),
    "StatusResponse.workers_omitted": ROUND,
    "StatusResponse.workers_connected": ROUND,
    "StatusResponse.run_id": RUN_ID,
    "StatusResponse.compression": Text(0, MAX_CODEC_NAME),
}


def largest(field: str, *, per_unit: int = 1) -> float:
    """The largest value of a setting that is sent as `field` (a number), with `per_unit` of the field's units
    to one of the setting's (1000: seconds sent as milliseconds): the setting's upper bound, so that a value
    which passes the configuration's checks also fits the wire."""
    bound = BOUNDS[field]
    if not isinstance(bound, Number) or bound.open_high:
        raise TypeError(f"{field} is not a number with a closed upper bound: {bound}")
    return bound.most if per_unit == 1 else bound.most / per_unit


def _message_type(field: FieldDescriptor) -> Descriptor:
    """The type of a message field's messages (protobuf sets it for every field of TYPE_MESSAGE)."""
    if field.message_type is None:
        raise TypeError(f"field {field.full_name} holds no messages")
    return field.message_type


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and _message_type(field).GetOptions().map_entry


def check(msg: Message, refusal: type[FeddiffError]) -> None:
    """Raise `refusal`, naming the field (`WorkerInfo.device has 1000000 characters: expected 0..64 printable
    characters`), for the first field of `msg` or of a message it holds that is outside its bound. Session ids
    are left to the lookup that follows."""
    # upb's descriptors are instances of Descriptor (its metaclass says so); the stubs name both classes.
    _check(msg, cast(Descriptor, msg.DESCRIPTOR), refusal)


def bounded_text(text: str, most: int = MAX_MESSAGE) -> str:
    """`text` as a message field takes it: control characters other than newline and tab made spaces, at most
    `most` characters (`shortened`: the end cut, marked with "...")."""
    return shortened("".join(c if c in "\n\t" or c.isprintable() else " " for c in text), most)


@dataclass(frozen=True)
class _Field:
    """A field as `_check` looks at it: its bound, an `Items` for a repeated field and a `Scalar` otherwise."""

    field: FieldDescriptor
    name: str  # Message.field
    items: Items | None = None
    scalar: Scalar | None = None


@functools.cache
def _fields_of(descriptor: Descriptor) -> tuple[_Field, ...]:
    """What `_check` looks at in a message type, once per type: each field with its bound (session ids left
    out). TypeError for a bound of the wrong kind: a repeated field's is an `Items`, any other field's not."""
    fields = []
    for f in descriptor.fields:
        if f.name == "session_id":
            continue
        name = f"{descriptor.name}.{f.name}"
        bound = BOUNDS.get(name)
        if isinstance(bound, Items):
            if not f.is_repeated:
                raise TypeError(f"{name} is not repeated, but its bound is {bound}")
            fields.append(_Field(f, name, items=bound))
        elif bound is not None and f.is_repeated:
            raise TypeError(f"{name} is repeated, but its bound is {bound}")
        else:
            fields.append(_Field(f, name, scalar=bound))
    return tuple(fields)


def _check(msg: Message, descriptor: Descriptor, refusal: type[FeddiffError]) -> None:
    for f in _fields_of(descriptor):
        field, name, bound = f.field, f.name, f.items
        value = getattr(msg, field.name)
        if bound is not None:
            if len(value) > bound.most:
                raise refusal(f"{name} has {len(value)} entries: expected {bound.describe()}")
            if _is_map(field):
                _check_map(name, value, bound, refusal)
            else:
                _check_items(field, name, value, bound, refusal)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated:
            if msg.HasField(field.name):
                _check(value, _message_type(field), refusal)
        elif f.scalar is not None:
            _check_scalar(name, value, f.scalar, refusal)


def _check_map(name: str, entries: Mapping[Any, Any], bound: Items, refusal: type[FeddiffError]) -> None:
    for key, value in entries.items():
        if bound.key is not None:
            _check_scalar(f"{name} key", key, bound.key, refusal)
        if bound.each is not None:
            _check_scalar(f"{name}[{str(key)[:40]!r}]", value, bound.each, refusal)


def _check_items(field: FieldDescriptor, name: str, values: Collection[Any], bound: Items, refusal: type[FeddiffError]) -> None:
    for value in values:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            _check(value, _message_type(field), refusal)
        elif bound.each is not None:
            _check_scalar(f"{name} entry", value, bound.each, refusal)


def _check_scalar(name: str, value: Any, bound: Scalar, refusal: type[FeddiffError]) -> None:
    """`value` is a field's: str, bytes or a number, as its type says and its bound (`BOUNDS`) expects."""
    problem = bound.problem(value)
    if problem is not None:
        raise refusal(f"{name} {problem}: expected {bound.describe()}")
