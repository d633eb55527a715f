"""Bad input against a real coordinator: every malformed, oversized, stale, duplicate or foreign update is refused
with its status code and counted by reason, the global model stays byte-identical, and the round closes with the
other worker's update alone."""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import safetensors.torch
import torch
from google.protobuf.message import Message

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.server import Coordinator
from fedcore.errors import MalformedTask, SettingOutOfRange, TaskRefused
from fedcore.federation.client import TrainTask
from fedcore.model.parts import ALL_PARTS, Part
from fedcore.model.unet import ModelName, build_model, layout_of
from fedcore.payload import coded, serialization
from fedcore.payload.codecs import Codec, Identity
from fedcore.payload.serialization import PayloadKind, PayloadMeta, PayloadReader
from fedcore.wire.convert import task_from_proto
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from fedcore.wire.stream import StreamHeader
from tests.system.raw_client import RawWorker

pytestmark = pytest.mark.badinput

MODEL: ModelName = "tiny"
LAYOUT = layout_of(build_model(MODEL, seed=0))
IMAGES = 64  # each worker's FedAvg weight: a power of two, so the mean of one update is that update, bit for bit
CHUNK = 16 << 10  # upload chunk: a udec delta (the decoder, ~146 KB) is ten of them
DEADLINE = 10.0  # seconds a round may wait; it closes at once when the good update is in and the bad one answered
Code = grpc.StatusCode
Tensors = dict[str, torch.Tensor]


# --- payloads --------------------------------------------------------------------------------------------
def _delta(parts: frozenset[Part], seed: int = 1) -> Tensors:
    """A small non-zero update of `parts`: within what one step at lr 1e-3 can reach (8e-3, fedcore.federation.robust)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s.shape, generator=g) * 1e-3 for n, s in LAYOUT.specs(parts).items()}


def _payload(
    task: TrainTask, tensors: Tensors, *, kind: PayloadKind = "delta", model: str = MODEL, round_index: int | None = None, parts: frozenset[Part] | None = None
) -> bytes:
    round_index = task.round_index if round_index is None else round_index
    meta = PayloadMeta(kind=kind, model=model, wire_round=round_index, parts=task.returns if parts is None else parts)
    return serialization.encode(tensors, meta)


def _pickled(tensors: Tensors) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def _snapshot(state: Tensors) -> Tensors:
    return {n: t.clone() for n, t in state.items()}


def _identical(a: Tensors, b: Tensors) -> bool:
    """Bit for bit (so -0.0 differs from 0.0)."""
    return a.keys() == b.keys() and all(torch.equal(a[n].view(torch.int32), b[n].view(torch.int32)) for n in a)


def _plus(state: Tensors, delta: Tensors) -> Tensors:
    return {n: state[n] + delta[n] if n in delta else state[n] for n in state}


def _wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- one round with a bad and a good worker --------------------------------------------------------------
@dataclass
class Round:
    coord: Coordinator
    bad: RawWorker
    good: RawWorker
    codec: Codec  # how the round's updates are coded
    bad_task: TrainTask = field(init=False)  # set by next_tasks
    good_task: TrainTask = field(init=False)
    before: Tensors = field(init=False)  # the global model the round started from

    def next_tasks(self) -> None:
        self.bad_task, self.good_task = task_from_proto(self.bad.wait_task()), task_from_proto(self.good.wait_task())
        self.before = _snapshot(self.coord.federation.global_state)

    def metric(self, name: str, **labels: str) -> float:
        return self.coord.metrics.registry.get_sample_value(name, labels) or 0.0

    def refuse(self, messages: Iterator[pb.UpdateChunk] | list[pb.UpdateChunk], code: grpc.StatusCode, reason: str) -> grpc.RpcError:
        """The bad worker's upload fails with `code`, is counted under `reason`, and leaves the model as it was."""
        with pytest.raises(grpc.RpcError) as e:
            self.bad.upload_messages(messages, timeout=10)
        assert (e.value.code(), (e.value.details() or "").split(":")[0]) == (code, reason), e.value.details()
        assert self.metric("feddiff_updates_total", outcome=reason) == 1
        assert _identical(self.coord.federation.global_state, self.before)
        return e.value

    def upload(self, worker: RawWorker, task: TrainTask, delta: Tensors) -> Tensors:
        """A well-formed update of `delta`, coded as the round codes them, goes in: returns what it stands for."""
        meta = PayloadMeta(kind="delta", model=MODEL, wire_round=task.round_index, parts=task.returns, codec=self.codec.name)
        payload = coded.encode(delta, meta)
        assert worker.upload_messages(worker.update_messages(task, payload, chunk_size=CHUNK), timeout=10).outcome == "accepted"
        return delta if isinstance(self.codec, Identity) else coded.decode(PayloadReader(LAYOUT, kind="delta"), self.codec, payload, task.returns)[0]

    def close_with_good(self, seed: int = 2, bad_in: bool = False) -> Tensors:
        """The good worker's update goes in; the round closes at once: the bad worker's update is in (`bad_in`)
        or it gives its task up (RejectTask), as a worker whose uploads were refused may. Returns what the
        good update stands for (its delta, decoded as sent)."""
        closed = self.coord.federation.completed_rounds + 1
        if not bad_in:
            request = pb.RejectTaskRequest(session_id=self.bad.session_id, task_id=self.bad_task.task_id, reason="other", message="gives up")
            self.bad.stub.RejectTask(request, timeout=10)
        delta = self.upload(self.good, self.good_task, _delta(self.good_task.returns, seed))
        _wait_for(lambda: self.coord.federation.completed_rounds == closed, DEADLINE + 10)
        return delta


@contextmanager
def _round(tmp_path: Path, rounds: int = 1, compression: str = "none") -> Iterator[Round]:
    cfg = CoordinatorConfig(
        compression=compression,
        model=MODEL,
        strategy="udec",
        rounds=rounds,
        epochs=1,
        lr=1e-3,
        min_workers=2,
        quorum=0.5,
        round_deadline=DEADLINE,
        listen="localhost:0",
        metrics_port=-1,
        insecure=True,
        progress="off",
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    coord = Coordinator(cfg, Metrics()).start()
    try:
        with grpc.insecure_channel(coord.address) as channel:
            r = Round(coord, RawWorker(channel, "bad", IMAGES), RawWorker(channel, "good", IMAGES), Codec.parse(compression))
            r.bad.join()
            r.good.join()
            r.next_tasks()
            yield r
    finally:
        coord.stop(grace=0)


# --- the bad worker's streams ----------------------------------------------------------------------------
Build = Callable[[Round], list[pb.UpdateChunk]]
Edit = Callable[[list[pb.UpdateChunk]], object]


def _upload(
    payload: Callable[[TrainTask, Tensors], bytes] | None = None,
    *,
    tensors: Callable[[Tensors], Tensors] | None = None,
    header: Callable[[bytes], StreamHeader] | None = None,
    edit: Edit | None = None,
    **fields: Any,
) -> Build:
    """The bad worker's stream for its own task: a well-formed update unless an argument breaks it. `fields`
    override `RawWorker.update_messages`' (a callable is given the round)."""

    def build(r: Round) -> list[pb.UpdateChunk]:
        delta = _delta(r.bad_task.returns)
        delta = tensors(delta) if tensors else delta
        data = payload(r.bad_task, delta) if payload else _payload(r.bad_task, delta)
        given = {k: v(r) if callable(v) else v for k, v in fields.items()}
        msgs = list(r.bad.update_messages(r.bad_task, data, header=header(data) if header else None, chunk_size=CHUNK, **given))
        if edit:
            edit(msgs)
        return msgs

    return build


def _set(path: str, value: object) -> Edit:
    """Set one field of the first message's UpdateHeader, e.g. `stream.blake3` or `report.mean_loss`."""
    *owners, name = path.split(".")

    def edit(msgs: list[pb.UpdateChunk]) -> None:
        target = msgs[0].header
        for owner in owners:
            target = getattr(target, owner)
        setattr(target, name, value)

    return edit


def _declared(size: Callable[[int], int]) -> Callable[[bytes], StreamHeader]:
    """A header with the payload's true digest and a declared size of `size(len(payload))`."""
    return lambda data: replace(StreamHeader.of(data), total_bytes=size(len(data)))


def _first(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Tensors], Tensors]:
    def tweak(delta: Tensors) -> Tensors:
        name = next(iter(delta))
        return {**delta, name: change(delta[name])}

    return tweak


def _poison(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[t.numel() // 2] = value
        return t

    return change


def _flip_a_bit(msgs: list[pb.UpdateChunk]) -> None:
    data = bytearray(msgs[3].data)
    data[100] ^= 0x01
    msgs[3].data = bytes(data)


def _drop_second_half(msgs: list[pb.UpdateChunk]) -> None:
    del msgs[len(msgs) // 2 :]


def _header_twice(msgs: list[pb.UpdateChunk]) -> None:
    msgs.insert(3, msgs[0])


INVALID, TOO_LARGE, STALE, DENIED = Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED, Code.FAILED_PRECONDITION, Code.PERMISSION_DENIED
GARBAGE = bytes(range(256)) * 600  # 150 KB, about a delta's size

CASES = [
    # not a feddiff safetensors payload (size and hash are right)
    pytest.param(_upload(lambda t, d: GARBAGE), INVALID, "not_safetensors", id="garbage"),
    pytest.param(_upload(lambda t, d: _pickled(d)), INVALID, "not_safetensors", id="torch-pickle"),
    pytest.param(_upload(lambda t, d: safetensors.torch.save(d)), INVALID, "not_safetensors", id="no-feddiff-metadata"),
    pytest.param(_upload(lambda t, d: _payload(t, d, kind="weights")), INVALID, "not_safetensors", id="weights-not-delta"),
    pytest.param(_upload(lambda t, d: _payload(t, d)[:-1000]), INVALID, "not_safetensors", id="truncated-payload"),
    # streams that disagree with their header
    pytest.param(_upload(edit=_drop_second_half), INVALID, "bad_size", id="truncated-stream"),
    pytest.param(_upload(edit=_flip_a_bit), INVALID, "bad_hash", id="chunk-breaks-hash"),
    pytest.param(_upload(header=_declared(lambda n: n + 1000)), INVALID, "bad_size", id="declared-more-than-sent"),
    pytest.param(_upload(header=_declared(lambda n: n - 1000)), TOO_LARGE, "too_large", id="sent-more-than-declared"),
    pytest.param(_upload(edit=_header_twice), INVALID, "bad_header", id="second-header-mid-stream"),
    pytest.param(_upload(edit=lambda m: m.pop(0)), INVALID, "bad_header", id="no-header"),
    pytest.param(_upload(edit=lambda m: m.clear()), INVALID, "bad_header", id="empty-stream"),
    # sizes beyond what the task's parts can need
    pytest.param(_upload(lambda t, d: _payload(t, _delta(ALL_PARTS), parts=ALL_PARTS)), TOO_LARGE, "too_large", id="larger-than-its-parts"),
    pytest.param(_upload(header=_declared(lambda n: 2**63)), TOO_LARGE, "too_large", id="declares-2**63-bytes"),
    pytest.param(_upload(header=_declared(lambda n: 2**64 - 1)), TOO_LARGE, "too_large", id="declares-2**64-1-bytes"),
    # unknown, missing, mis-shaped, mis-typed or non-finite tensors
    pytest.param(_upload(tensors=lambda d: {**d, "ups.9.extra.weight": torch.zeros(3)}), INVALID, "bad_schema", id="unknown-tensor"),
    pytest.param(_upload(tensors=lambda d: dict(list(d.items())[1:])), INVALID, "bad_schema", id="missing-tensor"),
    pytest.param(_upload(tensors=_first(lambda t: t.flatten()[:-1])), INVALID, "bad_schema", id="mis-shaped-tensor"),
    pytest.param(_upload(tensors=_first(lambda t: t.half())), INVALID, "bad_schema", id="mis-typed-tensor"),
    pytest.param(_upload(tensors=_first(_poison(math.nan))), INVALID, "non_finite", id="nan"),
    pytest.param(_upload(tensors=_first(_poison(-math.inf))), INVALID, "non_finite", id="inf"),
    pytest.param(_upload(lambda t, d: _payload(t, d, model="paper-fmnist")), INVALID, "bad_schema", id="other-model"),
    # another round
    pytest.param(_upload(lambda t, d: _payload(t, d, round_index=t.round_index + 1)), STALE, "wrong_round", id="payload-of-next-round"),
    pytest.param(_upload(round_index=lambda r: r.bad_task.round_index + 1), STALE, "wrong_round", id="header-of-next-round"),
    pytest.param(_upload(task_id="r1.1-bad"), STALE, "wrong_round", id="task-of-next-round"),
    pytest.param(_upload(task_id="r" * 10_000), INVALID, "bad_header", id="10KB-task-id"),
    pytest.param(_upload(task_id="\N{MICROBE}" * 2500), INVALID, "bad_header", id="10KB-emoji-task-id"),  # not echoed: its length is
    # parts, or a task, not given to this worker
    pytest.param(_upload(parts=["encoder", "decoder"]), DENIED, "not_assigned", id="header-claims-a-private-part"),
    pytest.param(_upload(lambda t, d: _payload(t, d, parts=ALL_PARTS)), DENIED, "not_assigned", id="payload-claims-every-part"),
    pytest.param(_upload(task_id=lambda r: r.good_task.task_id), DENIED, "not_assigned", id="another-workers-task"),
    pytest.param(_upload(parts=["decoder", "spleen"]), INVALID, "bad_header", id="unknown-part"),
    # out-of-range header fields
    pytest.param(_upload(edit=_set("stream.format_version", 99)), INVALID, "bad_header", id="format-version-99"),
    pytest.param(_upload(edit=_set("stream.blake3", "g" * 64)), INVALID, "bad_header", id="digest-not-hex"),
    pytest.param(_upload(edit=_set("stream.blake3", "ab" * 16)), INVALID, "bad_header", id="digest-short"),
    pytest.param(_upload(edit=_set("stream.sha256", "0" * 64)), INVALID, "bad_header", id="two-digests"),
    pytest.param(_upload(edit=_set("stream.total_bytes", 0)), INVALID, "bad_header", id="zero-bytes"),
    pytest.param(_upload(images_seen=0), INVALID, "bad_header", id="no-images-seen"),
    pytest.param(_upload(edit=_set("report.mean_loss", math.nan)), INVALID, "bad_header", id="loss-nan"),
    pytest.param(_upload(edit=_set("report.mean_loss", math.inf)), INVALID, "bad_header", id="loss-inf"),
    pytest.param(_upload(edit=_set("report.mean_loss", -1.0)), INVALID, "bad_header", id="loss-negative"),
    pytest.param(_upload(edit=_set("report.mean_loss", 1e300)), INVALID, "bad_header", id="loss-1e300"),
    pytest.param(_upload(images_seen=IMAGES + 1), INVALID, "bad_header", id="more-images-seen-than-declared"),
    pytest.param(_upload(images_seen=2**64 - 1), INVALID, "bad_header", id="2**64-1-images-seen"),
    pytest.param(_upload(tensors=_first(_poison(1e38))), INVALID, "out_of_bounds", id="1e38"),
    pytest.param(_upload(tensors=lambda d: {n: t * 100 for n, t in d.items()}), INVALID, "out_of_bounds", id="x100-beyond-adam"),
    pytest.param(_upload(edit=_set("session_id", "0" * 32)), Code.UNAUTHENTICATED, "unauthenticated", id="unknown-session"),
]


# --- coded updates (a run with --compression) -------------------------------------------------------------
Roles = dict[str, dict[str, torch.Tensor]]


def _coded(codec: str, edit: Callable[[Roles], object] | None = None, *, says: str | None = None) -> Callable[[TrainTask, Tensors], bytes]:
    """A delta payload coded by `codec` ("<tensor>/<role>" tensors, fedcore.payload.coded), its coded tensors
    changed by `edit`, its metadata naming codec `says` (default: `codec`)."""

    def payload(task: TrainTask, delta: Tensors) -> bytes:
        roles = {name: dict(e.tensors) for name, e in Codec.parse(codec).encode_all(delta).items()}
        if edit:
            edit(roles)
        tensors = {coded.coded_name(name, role): t.clone() for name, rs in roles.items() for role, t in rs.items()}
        return serialization.encode(tensors, PayloadMeta(kind="delta", model=MODEL, wire_round=task.round_index, parts=task.returns, codec=says or codec))

    return payload


def _role(role: str, change: Callable[[torch.Tensor], torch.Tensor | None]) -> Callable[[Roles], None]:
    """Change one coded tensor of the largest tensor (in place, or replaced by what `change` returns; dropped when
    `role` is "-" + a role)."""

    def edit(roles: Roles) -> None:
        largest = max(roles, key=lambda n: LAYOUT.specs(ALL_PARTS)[n].numel)
        if role.startswith("-"):
            del roles[largest][role[1:]]
            return
        t = roles[largest][role].clone()
        roles[largest][role] = t if (changed := change(t)) is None else changed

    return edit


def _at(i: int, value: float) -> Callable[[torch.Tensor], None]:
    def change(t: torch.Tensor) -> None:
        t[i] = value

    return change


TOPK = "topk:0.05+int8"
CODED_CASES = [
    # another codec than the run's
    pytest.param("int8", _upload(_coded("int4")), INVALID, "bad_codec", id="int4-in-an-int8-run"),
    pytest.param("int8", _upload(_coded("int8:32")), INVALID, "bad_codec", id="other-block-size"),
    pytest.param("int8", _upload(_payload), TOO_LARGE, "too_large", id="float32-in-an-int8-run"),  # over the int8 bound, unread
    pytest.param("int4", _upload(_coded("int8")), INVALID, "bad_codec", id="int8-in-an-int4-run"),
    pytest.param("int8", _upload(_coded("int8", says="int9")), INVALID, "bad_codec", id="unknown-codec"),
    pytest.param("none", _upload(_coded("int8")), INVALID, "bad_codec", id="int8-in-a-float32-run"),
    # scales: negative, zero over nonzero codes, larger than the codes say
    pytest.param("int8", _upload(_coded("int8", _role("absmax", lambda t: -t))), INVALID, "bad_scale", id="negative-absmax"),
    pytest.param("int8", _upload(_coded("int8", _role("absmax", _at(0, 0.0)))), INVALID, "bad_scale", id="zero-absmax"),
    pytest.param("int8", _upload(_coded("int8", _role("codes", lambda t: t // 2))), INVALID, "bad_scale", id="codes-below-their-scale"),
    pytest.param("int8", _upload(_coded("int8", _role("absmax", _at(0, math.nan)))), INVALID, "non_finite", id="nan-absmax"),
    pytest.param("int8", _upload(_coded("int8", _role("absmax", lambda t: t * 1e4))), INVALID, "out_of_bounds", id="x10000-absmax"),
    # codes outside -Q..Q
    pytest.param("int8", _upload(_coded("int8", _role("codes", _at(0, -128)))), INVALID, "bad_code", id="int8-code-minus-128"),
    pytest.param("int4", _upload(_coded("int4", _role("codes", _at(0, 0x80)))), INVALID, "bad_code", id="int4-code-minus-8"),
    # top-k indices: unsorted, repeated, out of range
    pytest.param(TOPK, _upload(_coded(TOPK, _role("indices", lambda t: t.flip(0)))), INVALID, "bad_indices", id="indices-decreasing"),
    pytest.param(
        TOPK, _upload(_coded(TOPK, _role("indices", lambda t: t.index_fill_(0, torch.tensor([1]), int(t[0]))))), INVALID, "bad_indices", id="index-repeated"
    ),
    pytest.param(TOPK, _upload(_coded(TOPK, _role("indices", _at(-1, 2**31 - 1)))), INVALID, "bad_indices", id="index-past-the-end"),
    pytest.param(TOPK, _upload(_coded(TOPK, _role("indices", _at(0, -1)))), INVALID, "bad_indices", id="index-negative"),
    pytest.param("topk:0.05", _upload(_coded("topk:0.05", _role("values", _at(0, math.inf)))), INVALID, "non_finite", id="topk-value-inf"),
    # coded tensors missing, mis-typed or mis-sized
    pytest.param("int8", _upload(_coded("int8", _role("-absmax", lambda t: None))), INVALID, "bad_schema", id="absmax-missing"),
    pytest.param("int8", _upload(_coded("int8", _role("codes", lambda t: t.to(torch.int16)))), INVALID, "bad_schema", id="codes-int16"),
    pytest.param(TOPK, _upload(_coded(TOPK, _role("indices", lambda t: t[:-1]))), INVALID, "bad_schema", id="one-index-short"),
]


@pytest.mark.parametrize(("codec", "build", "code", "reason"), CODED_CASES)
def test_a_bad_coded_update_is_refused_and_the_round_closes_with_the_good_one(
    codec: str, build: Build, code: grpc.StatusCode, reason: str, tmp_path: Path
) -> None:
    with _round(tmp_path, compression=codec) as r:
        r.refuse(build(r), code, reason)

        delta = r.close_with_good()

        assert _identical(r.coord.federation.global_state, _plus(r.before, delta))
        assert r.metric("feddiff_updates_total", outcome="accepted") == 1


@pytest.mark.parametrize(("build", "code", "reason"), CASES)
def test_a_bad_update_is_refused_and_the_round_closes_with_the_good_one(build: Build, code: grpc.StatusCode, reason: str, tmp_path: Path) -> None:
    with _round(tmp_path) as r:
        r.refuse(build(r), code, reason)

        delta = r.close_with_good()

        assert _identical(r.coord.federation.global_state, _plus(r.before, delta))
        assert r.metric("feddiff_updates_total", outcome="accepted") == 1


def test_a_stream_longer_than_declared_is_cut_off_when_the_excess_arrives(tmp_path: Path) -> None:
    with _round(tmp_path) as r:
        data = _payload(r.bad_task, _delta(r.bad_task.returns))
        declared = 1 + math.ceil(len(data) / CHUNK)  # header + data messages
        pulled = 0

        def endless() -> Iterator[pb.UpdateChunk]:
            """The declared payload, then zeros for ever."""
            nonlocal pulled
            for msg in r.bad.update_messages(r.bad_task, data, chunk_size=CHUNK):
                pulled += 1
                yield msg
            while True:
                pulled += 1
                yield pb.UpdateChunk(data=bytes(CHUNK))

        start = time.monotonic()
        r.refuse(endless(), TOO_LARGE, "too_large")
        seconds, excess = time.monotonic() - start, pulled - declared
        read = r.metric("feddiff_wire_bytes_total", direction="up")
        delta = r.close_with_good()

        assert seconds < 5, "refused at once, not at a timeout"
        assert read <= len(data) + CHUNK + 1024, f"the server read {read} bytes: one chunk past the {len(data)} declared, then stopped"
        assert 1 <= excess <= 16, f"{excess} chunks past the declared size left the client: only what flow control let through"
        assert pulled == declared + excess, "the client stopped sending when the call ended"
        assert _identical(r.coord.federation.global_state, _plus(r.before, delta))


def test_a_duplicate_upload_is_refused_and_the_first_one_counts(tmp_path: Path) -> None:
    with _round(tmp_path) as r:
        first = _delta(r.bad_task.returns, seed=3)
        r.upload(r.bad, r.bad_task, first)
        again = r.bad.update_messages(r.bad_task, _payload(r.bad_task, _delta(r.bad_task.returns, seed=4)), chunk_size=CHUNK)

        r.refuse(again, Code.ALREADY_EXISTS, "duplicate")
        good = r.close_with_good(bad_in=True)

        mean = {n: torch.zeros_like(t).add_(t, alpha=IMAGES).add_(good[n], alpha=IMAGES) / (2 * IMAGES) for n, t in first.items()}
        assert _identical(r.coord.federation.global_state, _plus(r.before, mean))


def test_updates_for_a_past_round_are_refused_and_the_next_round_goes_on(tmp_path: Path) -> None:
    with _round(tmp_path, rounds=2) as r:
        past = r.bad_task
        replay = list(r.bad.update_messages(past, _payload(past, _delta(past.returns, seed=3)), chunk_size=CHUNK))
        r.bad.upload_messages(replay, timeout=10)
        r.close_with_good(bad_in=True)
        r.next_tasks()
        assert r.bad_task.round_index == past.round_index + 1

        r.refuse(replay, STALE, "late")  # round 1's update, sent again in round 2
        old_payload = r.bad.update_messages(r.bad_task, _payload(r.bad_task, _delta(past.returns), round_index=past.round_index), chunk_size=CHUNK)
        r.refuse(old_payload, STALE, "wrong_round")  # this round's task, last round's payload
        delta = r.close_with_good(seed=5)

        assert _identical(r.coord.federation.global_state, _plus(r.before, delta))


def test_out_of_range_join_and_session_fields_are_refused_while_the_round_goes_on(tmp_path: Path) -> None:
    with _round(tmp_path) as r:
        stub = r.good.stub
        joins = [("", 10), ("w" * 129, 10), ("../etc/passwd", 10), ("two words", 10), ("ok-id", 0)]
        for worker_id, images in joins:
            with pytest.raises(grpc.RpcError) as e:
                stub.Join(pb.JoinRequest(worker=pb.WorkerInfo(worker_id=worker_id, num_examples=images)), timeout=10)
            assert e.value.code() == INVALID, (worker_id, images)
        calls: list[tuple[Callable[..., object], Message]] = [
            (stub.WaitTask, pb.WaitTaskRequest(session_id="s" * 10_000, timeout_ms=1)),
            (stub.Heartbeat, pb.HeartbeatRequest(session_id="")),
        ]
        for call, request in calls:
            with pytest.raises(grpc.RpcError) as e:
                call(request, timeout=10)
            assert e.value.code() == Code.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            list(stub.DownloadWeights(pb.DownloadRequest(session_id=r.bad.session_id, task_id="t" * 10_000), timeout=10))
        assert (e.value.code(), e.value.details()) == (
            INVALID,
            "bad_field: DownloadRequest.task_id has 10000 characters: expected 1..256 characters of [A-Za-z0-9._-]",
        )

        assert [w.worker_id for w in r.coord.registry.all()] == ["bad", "good"]
        assert _identical(r.coord.federation.global_state, r.before)
        delta = r.close_with_good()
        assert _identical(r.coord.federation.global_state, _plus(r.before, delta))


# --- the worker's side: tasks with out-of-range fields ----------------------------------------------------
def _task(returns: tuple[str, ...] = ("decoder",), receives: tuple[str, ...] = ("decoder",), **train: Any) -> pb.Task:
    spec: dict[str, Any] = {"epochs": 1, "batch_size": 8, "lr": 1e-4, "loss": "huber", "seed": 0, **train}
    return pb.Task(kind=pb.Task.TRAIN, round=0, task_id="r0.1-w", receives=receives, returns=returns, train=pb.TrainSpec(**spec))


def test_a_well_formed_task_is_read() -> None:
    task = task_from_proto(_task(epochs=3, lr=0.5, loss="mse"))
    assert (task.train.epochs, task.train.lr, task.train.loss, task.returns) == (3, 0.5, "mse", frozenset({Part.DECODER}))


@pytest.mark.parametrize(
    ("msg", "refusal"),
    [
        (_task(epochs=0), SettingOutOfRange),
        (_task(epochs=10**9), SettingOutOfRange),
        (_task(batch_size=0), SettingOutOfRange),
        (_task(batch_size=2**32 - 1), SettingOutOfRange),
        (_task(lr=math.nan), SettingOutOfRange),
        (_task(lr=math.inf), SettingOutOfRange),
        (_task(lr=-1e-4), SettingOutOfRange),
        (_task(lr=0.0), SettingOutOfRange),
        (_task(loss="l1"), SettingOutOfRange),
        (_task(loss=""), SettingOutOfRange),
        (_task(receives=("decoder", "spleen")), MalformedTask),
        (_task(returns=("encoder",)), MalformedTask),  # returns what it did not receive
        (_task(receives=(), returns=()), MalformedTask),
    ],
    ids=[
        "epochs-0",
        "epochs-1e9",
        "batch-0",
        "batch-2**32-1",
        "lr-nan",
        "lr-inf",
        "lr-negative",
        "lr-0",
        "loss-l1",
        "loss-empty",
        "unknown-part",
        "returns-unreceived",
        "nothing-received",
    ],
)
def test_a_worker_refuses_a_task_with_out_of_range_fields(msg: pb.Task, refusal: type[TaskRefused]) -> None:
    with pytest.raises(refusal):
        task_from_proto(msg)
