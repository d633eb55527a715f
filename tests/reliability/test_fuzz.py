"""Fuzzing the receiving side (hypothesis): stream headers and chunk reassembly, safetensors parsing and schema
checks, and protobuf tasks and headers. Whatever arrives, the result is the payload or a typed FeddiffError:
never another exception, never a hang."""

from __future__ import annotations

import contextlib
import json
import math
import struct
from dataclasses import replace
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcore.errors import FeddiffError, HashMismatch, HeaderError, SizeMismatch, StreamTooLong, TaskRefused
from fedcore.federation.client import EvalTask, TrainTask
from fedcore.federation.engine import payload_bytes_by_part
from fedcore.model.parts import Part, PartLayout, TensorSpec
from fedcore.payload import serialization
from fedcore.payload.serialization import FORMAT_VERSION, PayloadMeta
from fedcore.settings import MAX_BATCH, MAX_EPOCHS, MAX_EVAL_SAMPLES
from fedcore.wire import convert
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from fedcore.wire.stream import DIGESTS, StreamHeader

pytestmark = [pytest.mark.badinput, pytest.mark.timeout(300)]


def fuzz(cases: int) -> settings:
    """`cases` examples, the same ones on every run (CI), each under a generous time limit (a hang fails)."""
    return settings(
        max_examples=cases,
        deadline=timedelta(seconds=2),
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- stream headers and chunk reassembly -------------------------------------------------------------------
MAX_BYTES = 4096  # the receiver's limit in these tests; the buffer is allocated from a header under it
HEX = "0123456789abcdef"
digests = st.one_of(st.text(HEX, min_size=64, max_size=64), st.text(max_size=80))
headers = st.builds(
    StreamHeader,
    total_bytes=st.one_of(st.integers(-10, MAX_BYTES + 10), st.integers(-(2**64), 2**64)),
    digest=digests,
    algorithm=st.one_of(st.sampled_from(sorted(DIGESTS)), st.text(max_size=10)),
    format_version=st.one_of(st.just(FORMAT_VERSION), st.integers(-1, 2**32)),
)


@fuzz(400)
@given(header=headers, chunks=st.lists(st.binary(max_size=300), max_size=20))
def test_any_header_and_chunks_give_the_declared_bytes_or_a_typed_error(header: StreamHeader, chunks: list[bytes]) -> None:
    try:
        out = convert.reassemble(header, chunks, max_bytes=MAX_BYTES)
    except FeddiffError:
        return
    assert bytes(out) == b"".join(chunks)
    assert len(out) == header.total_bytes <= MAX_BYTES and StreamHeader.of(bytes(out), header.algorithm) == header


FAULTS = ["none", "flip", "drop", "extra", "declare_more", "declare_less", "version", "digest"]


@st.composite
def faulty_streams(draw: st.DrawFn) -> tuple[StreamHeader, list[bytes], str, type[Exception] | None]:
    """A payload's header and chunks with one fault, and the error it must cause (None: accepted)."""
    payload = draw(st.binary(min_size=1, max_size=MAX_BYTES))
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=8)))
    chunks = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    header = StreamHeader.of(payload, draw(st.sampled_from(sorted(DIGESTS))))
    fault = draw(st.sampled_from(FAULTS))
    expected: type[Exception] | None = None
    if fault == "flip":
        i = draw(st.sampled_from([i for i, c in enumerate(chunks) if c]))
        at = draw(st.integers(0, len(chunks[i]) - 1))
        chunks[i] = chunks[i][:at] + bytes([chunks[i][at] ^ draw(st.integers(1, 255))]) + chunks[i][at + 1 :]
        expected = HashMismatch
    elif fault == "drop":
        chunks.pop(draw(st.sampled_from([i for i, c in enumerate(chunks) if c])))
        expected = SizeMismatch
    elif fault == "extra":
        chunks.insert(draw(st.integers(0, len(chunks))), draw(st.binary(min_size=1, max_size=64)))
        expected = StreamTooLong
    elif fault == "declare_more":
        header = replace(header, total_bytes=header.total_bytes + draw(st.integers(1, 2**64)))
        expected = SizeMismatch if header.total_bytes <= MAX_BYTES else StreamTooLong
    elif fault == "declare_less":
        header = replace(header, total_bytes=header.total_bytes - draw(st.integers(1, len(payload))))
        expected = StreamTooLong if header.total_bytes > 0 else HeaderError
    elif fault == "version":
        header = replace(header, format_version=draw(st.integers(0, 2**32).filter(lambda v: v != FORMAT_VERSION)))
        expected = HeaderError
    elif fault == "digest":
        header = replace(header, digest=draw(digests.filter(lambda d: d != header.digest)))
        expected = HashMismatch if len(header.digest) == 64 and set(header.digest) <= set(HEX) else HeaderError
    return header, chunks, fault, expected


@fuzz(400)
@given(stream=faulty_streams())
def test_each_stream_fault_is_refused_with_its_own_error(stream: tuple[StreamHeader, list[bytes], str, type[Exception] | None]) -> None:
    header, chunks, _fault, expected = stream
    if expected is None:
        assert bytes(convert.reassemble(header, chunks, max_bytes=MAX_BYTES)) == b"".join(chunks)
        return
    with pytest.raises(expected):
        convert.reassemble(header, chunks, max_bytes=MAX_BYTES)


# --- safetensors parsing and schema checks ---------------------------------------------------------------
ENC, MID, DEC = Part.ENCODER, Part.BOTTLENECK, Part.DECODER
LAYOUT = PartLayout(
    {
        ENC: {"enc.w": TensorSpec((3, 2), torch.float32), "enc.b": TensorSpec((3,), torch.float32)},
        MID: {"mid.w": TensorSpec((2, 2, 1), torch.float32)},
        DEC: {"dec.w": TensorSpec((4,), torch.float32), "dec.empty": TensorSpec((0, 2), torch.float32)},
    }
)
PARTS = frozenset({ENC, DEC})
ROUND = 3
VALID = serialization.encode(
    {n: torch.arange(s.numel, dtype=torch.float32).reshape(s.shape) / 7 for n, s in LAYOUT.specs(PARTS).items()},
    PayloadMeta(kind="delta", model="fuzz", wire_round=ROUND, parts=PARTS),
)
(VALID_HEADER_LEN,) = struct.unpack("<Q", VALID[:8])
VALID_HEADER: dict[str, object] = json.loads(VALID[8 : 8 + VALID_HEADER_LEN])
VALID_BODY = VALID[8 + VALID_HEADER_LEN :]


def _check_decode(data: bytes | bytearray) -> None:
    """Decoding gives tensors of exactly the expected schema, finite, or a typed error; nothing else."""
    try:
        tensors = serialization.decode(bytearray(data), LAYOUT, kind="delta", parts=PARTS, wire_round=ROUND, model="fuzz")
    except FeddiffError:
        return
    specs = LAYOUT.specs(PARTS)
    assert list(tensors) == list(specs)
    for name, t in tensors.items():
        assert (tuple(t.shape), t.dtype) == (specs[name].shape, specs[name].dtype)
        assert bool(torch.isfinite(t).all())
    assert sum(payload_bytes_by_part(bytes(data), LAYOUT).values()) == len(data)


def _with_header(header: object, body: bytes = VALID_BODY) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@fuzz(200)
@given(data=st.one_of(st.binary(max_size=2048), st.builds(lambda n, rest: struct.pack("<Q", n) + rest, st.integers(0, 2**64 - 1), st.binary(max_size=512))))
def test_arbitrary_bytes_are_not_safetensors(data: bytes) -> None:
    with contextlib.suppress(FeddiffError):
        serialization.read_header(data)
    _check_decode(data)


@fuzz(200)
@given(header=json_values, body=st.binary(max_size=256))
def test_an_arbitrary_json_header_gives_a_typed_error(header: object, body: bytes) -> None:
    _check_decode(_with_header(header, body))


@st.composite
def mutated_payloads(draw: st.DrawFn) -> bytes:
    """The valid payload with bits flipped, cut short, extended, overwritten or with another header length."""
    data = bytearray(VALID)
    how = draw(st.sampled_from(["flip", "truncate", "extend", "overwrite", "length"]))
    if how == "flip":
        for at in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[at] ^= 1 << draw(st.integers(0, 7))
    elif how == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif how == "extend":
        data += draw(st.binary(min_size=1, max_size=64))
    elif how == "overwrite":
        at = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=32))
        data[at : at + len(patch)] = patch
    else:
        data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return bytes(data)


@fuzz(300)
@given(data=mutated_payloads())
def test_a_mutated_payload_decodes_to_the_schema_or_gives_a_typed_error(data: bytes) -> None:
    _check_decode(data)


ENTRY_KEYS = ["dtype", "shape", "data_offsets", "extra"]
METADATA_KEYS = ["format_version", "kind", "model", "round", "parts", "dtype", "extra"]
dtype_names = st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "f32", "", "C64"])
NASTY = ["1" * 5000, "[" * 100_000, "1e400", "-0", '"\\ud800"', "NaN", "-Infinity", '"\\u0000"', "{}", "null", "18446744073709551616"]


@st.composite
def edited_headers(draw: st.DrawFn) -> bytes:
    """The valid payload with its JSON header edited: entries' dtype, shape or offsets, metadata values,
    tensors renamed, added or removed, or the raw text spliced with a nasty literal."""
    header = json.loads(json.dumps(VALID_HEADER))
    names = [n for n in header if n != "__metadata__"]
    how = draw(st.sampled_from(["entry", "metadata", "rename", "add", "remove", "raw"]))
    if how == "entry":
        entry = header[draw(st.sampled_from(names))]
        key = draw(st.sampled_from(ENTRY_KEYS))
        entry[key] = draw(
            dtype_names
            if key == "dtype"
            else st.one_of(st.lists(st.integers(-(2**65), 2**65), max_size=4), st.lists(st.integers(0, 200), max_size=3), json_values)
        )
    elif how == "metadata":
        meta = header["__metadata__"]
        meta[draw(st.sampled_from(METADATA_KEYS))] = draw(
            st.one_of(st.text(max_size=30), st.sampled_from(["delta", "weights", "encoder,decoder", "decoder", "3", "-3", "1"]), json_values)
        )
    elif how == "rename":
        header[draw(st.text(max_size=12))] = header.pop(draw(st.sampled_from(names)))
    elif how == "add":
        header[draw(st.text(max_size=12))] = draw(json_values)
    elif how == "remove":
        del header[draw(st.sampled_from([*names, "__metadata__"]))]
    if how != "raw":
        return _with_header(header)
    text = json.dumps(header)
    at = draw(st.integers(0, len(text)))
    cut = draw(st.integers(0, 12))
    text = text[:at] + draw(st.sampled_from(NASTY)) + text[at + cut :]
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + VALID_BODY


@fuzz(400)
@given(data=edited_headers())
def test_an_edited_header_decodes_to_the_schema_or_gives_a_typed_error(data: bytes) -> None:
    _check_decode(data)


def test_the_valid_payload_decodes() -> None:
    tensors = serialization.decode(bytearray(VALID), LAYOUT, kind="delta", parts=PARTS, wire_round=ROUND, model="fuzz")
    assert list(tensors) == ["enc.w", "enc.b", "dec.w", "dec.empty"]


# --- protobuf tasks and stream headers -------------------------------------------------------------------
texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=24)  # protobuf strings are UTF-8
part_lists = st.lists(st.one_of(st.sampled_from([p.value for p in Part]), texts), max_size=4)
uint32 = st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1))
uint64 = st.integers(0, 2**64 - 1)
doubles = st.one_of(st.floats(0, 1), st.floats())
tasks = st.builds(
    pb.Task,
    kind=st.integers(-2, 4),
    round=uint32,
    task_id=texts,
    receives=part_lists,
    returns=part_lists,
    private_parts=part_lists,
    train=st.builds(pb.TrainSpec, epochs=uint32, batch_size=uint32, lr=doubles, loss=st.one_of(st.sampled_from(["huber", "mse"]), texts), seed=uint64),
    eval=st.builds(
        pb.EvalSpec, sampler=st.one_of(st.sampled_from(["ddim", "ddpm"]), texts), steps=uint32, num_samples=uint32, seed=uint64, share_samples=st.booleans()
    ),
    payload_bytes=uint64,
    payload_sha256=texts,
    payload_blake3=texts,
)


@fuzz(300)
@given(msg=tasks)
def test_a_task_is_read_in_range_or_refused(msg: pb.Task) -> None:
    try:
        task = convert.any_task_from_proto(msg)
    except TaskRefused:
        return
    assert task.receives and task.task_id == msg.task_id
    if isinstance(task, TrainTask):
        assert 1 <= task.train.epochs <= MAX_EPOCHS and 1 <= task.train.batch_size <= MAX_BATCH
        assert math.isfinite(task.train.lr) and 0 < task.train.lr < 1 and task.train.loss in ("huber", "mse")
        assert task.returns <= task.receives
    else:
        assert isinstance(task, EvalTask) and 1 <= task.spec.num_samples <= MAX_EVAL_SAMPLES


@fuzz(300)
@given(
    msg=st.builds(
        pb.StreamHeader,
        round=uint32,
        task_id=texts,
        parts=part_lists,
        total_bytes=st.one_of(st.integers(0, 2 * MAX_BYTES), uint64),
        sha256=st.one_of(st.just(""), digests),
        blake3=st.one_of(st.just(""), digests),
        format_version=uint32,
    )
)
def test_a_stream_header_is_checked_or_refused(msg: pb.StreamHeader) -> None:
    try:
        parts = convert.parts_from_proto(msg.parts)
        header = convert.header_from_proto(msg)
        header.check(max_bytes=MAX_BYTES)
    except FeddiffError:
        return
    assert parts <= set(Part) and 0 < header.total_bytes <= MAX_BYTES and header.format_version == FORMAT_VERSION
    assert len(header.digest) == 64 and set(header.digest) <= set(HEX) and header.algorithm in DIGESTS
    assert header.digest == (msg.blake3 or msg.sha256) and not (msg.blake3 and msg.sha256)
