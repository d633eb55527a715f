"""Tests for fedcore.payload.serialization: payload roundtrips, and every malformed payload refused with a named reason."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import pytest
import safetensors.torch
import torch

from fedcore.errors import (
    NonFiniteTensor,
    NotAssigned,
    NotSafetensors,
    PayloadError,
    RoundError,
    SchemaError,
    WrongRound,
)
from fedcore.federation.client import EvalTask
from fedcore.model.diffusers_unet import DiffusersUNetConfig
from fedcore.model.diffusion import SamplingSpec
from fedcore.model.parts import ALL_PARTS, Part, PartLayout
from fedcore.model.unet import PRESETS, build_model, layout_of, preset
from fedcore.payload.serialization import HEADER_BYTES_PER_TENSOR, PayloadMeta, decode, encode, load_file, max_payload_bytes, read_meta, save_file

ENC, MID, DEC = Part.ENCODER, Part.BOTTLENECK, Part.DECODER
DECODER_ONLY = frozenset({DEC})


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return build_model("tiny", seed=0).state_dict()


def _parts_of(state: dict[str, torch.Tensor], layout: PartLayout, parts) -> dict[str, torch.Tensor]:
    """The tensors of `state` in `parts`, in the layout's order: a payload as the coordinator and workers send it."""
    return {n: state[n] for n in layout.names(parts)}


def _meta(parts=DECODER_ONLY, kind="delta", wire_round=3, model="tiny") -> PayloadMeta:
    return PayloadMeta(kind=kind, model=model, wire_round=wire_round, parts=frozenset(parts))


def _decode(data, layout: PartLayout, parts=DECODER_ONLY, kind="delta", wire_round=3):
    return decode(data, layout, kind=kind, parts=parts, wire_round=wire_round, model="tiny")


def _raw(header: object, body: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


# --- roundtrip -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parts",
    [ALL_PARTS, frozenset({ENC}), frozenset({MID}), DECODER_ONLY, frozenset({MID, DEC}), frozenset({ENC, MID})],
)
def test_roundtrip_of_parts(parts: frozenset[Part], state, tiny_layout: PartLayout) -> None:
    tensors = _parts_of(state, tiny_layout, parts)
    data = encode(tensors, _meta(parts))

    decoded = _decode(bytearray(data), tiny_layout, parts)

    assert list(decoded) == tiny_layout.names(parts)
    assert all(torch.equal(decoded[n], tensors[n]) for n in tensors)
    assert read_meta(data) == _meta(parts)


def test_decode_of_a_bytearray_shares_its_memory(state, tiny_layout: PartLayout) -> None:
    buffer = bytearray(encode(_parts_of(state, tiny_layout, DECODER_ONLY), _meta()))

    decoded = _decode(buffer, tiny_layout)

    before = bytes(buffer)
    next(iter(decoded.values())).fill_(0.5)  # written through to the received buffer: no second copy

    assert bytes(buffer) != before
    assert len(buffer) == len(before)


def test_decode_of_read_only_bytes_copies(state, tiny_layout: PartLayout) -> None:
    data = encode(_parts_of(state, tiny_layout, DECODER_ONLY), _meta())

    decoded = _decode(data, tiny_layout)
    next(iter(decoded.values())).add_(1.0)  # writable, and the bytes are untouched

    assert _decode(data, tiny_layout)[tiny_layout.names(DECODER_ONLY)[0]].equal(state[tiny_layout.names(DECODER_ONLY)[0]])


def test_metadata_names_format_kind_round_and_parts() -> None:
    md = _meta(frozenset({DEC, MID}), kind="weights", wire_round=7).as_metadata()

    assert md == {
        "format_version": "1",
        "kind": "weights",
        "model": "tiny",
        "round": "7",
        "parts": "bottleneck,decoder",
        "dtype": "float32",
    }


def test_save_and_load_file(tmp_path, state) -> None:
    save_file(tmp_path / "m.safetensors", state, {"completed_rounds": "2"})

    loaded, metadata = load_file(tmp_path / "m.safetensors")

    assert metadata == {"completed_rounds": "2"}
    assert set(loaded) == set(state) and all(torch.equal(loaded[n], state[n]) for n in state)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left behind


# --- not safetensors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\x02\x03",
        os.urandom(4096),
        struct.pack("<Q", 1000) + b"{}",  # header longer than the payload
        struct.pack("<Q", 1 << 62) + b"x" * 64,  # absurd header length
        struct.pack("<Q", 10) + b"not json!!",
        struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",  # not UTF-8
        _raw([1, 2, 3]),
        _raw({"__metadata__": ["a"]}),
        _raw({"__metadata__": {"kind": 5}}),
        _raw({"__metadata__": {}}),  # not feddiff's metadata
        _raw({"__metadata__": {"kind": "delta", "model": "tiny", "round": "x", "parts": "decoder", "format_version": "1"}}),
        _raw({"__metadata__": {"kind": "delta", "model": "tiny", "round": "3", "parts": "legs", "format_version": "1"}}),
        _raw({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4),
        _raw({"w": {"dtype": "F32", "shape": 7, "data_offsets": [0, 4]}}, b"\x00" * 4),
        _raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, b"\x00" * 8),
        _raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\x00" * 4),  # range too short
        _raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\x00" * 4),  # past the end
        _raw({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\x00" * 4),
        _raw({"w": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}, b"\x00" * 4),  # int(inf)
        _raw({"w": "F32"}, b"\x00" * 4),
        _raw(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},  # overlaps a
            },
            b"\x00" * 12,
        ),
        struct.pack("<Q", 200_000) + b"[" * 200_000,  # deeply nested JSON
    ],
    ids=lambda d: f"{len(d)}B",
)
def test_garbage_is_not_safetensors(data: bytes, tiny_layout: PartLayout) -> None:
    with pytest.raises(NotSafetensors) as excinfo:
        _decode(data, tiny_layout)

    assert excinfo.value.reason == "not_safetensors"
    assert isinstance(excinfo.value, PayloadError)


def test_truncated_payload_is_not_safetensors(state, tiny_layout: PartLayout) -> None:
    data = encode(_parts_of(state, tiny_layout, DECODER_ONLY), _meta())

    for cut in (4, 8, 20, len(data) // 2, len(data) - 1):
        with pytest.raises(NotSafetensors):
            _decode(data[:cut], tiny_layout)


# --- schema ----------------------------------------------------------------------------------------------


def _with(tensors: dict[str, torch.Tensor], **changes) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for name, value in changes.items():
        if value is None:
            del out[name]
        else:
            out[name] = value
    return out


def test_unknown_tensor_is_named(state, tiny_layout: PartLayout) -> None:
    tensors = _parts_of(state, tiny_layout, DECODER_ONLY)
    tensors["ups.9.sneaky.weight"] = torch.zeros(3)

    with pytest.raises(SchemaError, match=r"unknown tensor 'ups\.9\.sneaky\.weight'") as excinfo:
        _decode(encode(tensors, _meta()), tiny_layout)

    assert excinfo.value.reason == "bad_schema"


def test_tensor_of_another_part_is_unknown(state, tiny_layout: PartLayout) -> None:
    tensors = _parts_of(state, tiny_layout, DECODER_ONLY)
    tensors["init_conv.weight"] = state["init_conv.weight"]

    with pytest.raises(SchemaError, match=r"unknown tensor 'init_conv\.weight'"):
        _decode(encode(tensors, _meta()), tiny_layout)


def test_missing_tensor_is_named(state, tiny_layout: PartLayout) -> None:
    tensors = _parts_of(state, tiny_layout, DECODER_ONLY)
    del tensors["final_conv.bias"]

    with pytest.raises(SchemaError, match=r"missing tensor 'final_conv\.bias'"):
        _decode(encode(tensors, _meta()), tiny_layout)


def test_wrong_shape_is_named(state, tiny_layout: PartLayout) -> None:
    tensors = _parts_of(state, tiny_layout, DECODER_ONLY)
    expected = tuple(tensors["final_conv.weight"].shape)
    tensors["final_conv.weight"] = torch.zeros(2, *expected[1:])

    with pytest.raises(SchemaError, match=rf"tensor 'final_conv\.weight' has shape \(2, .*expected \({expected[0]},"):
        _decode(encode(tensors, _meta()), tiny_layout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16, torch.int32])
def test_wrong_dtype_is_named(dtype: torch.dtype, state, tiny_layout: PartLayout) -> None:
    tensors = _parts_of(state, tiny_layout, DECODER_ONLY)
    tensors["final_conv.weight"] = tensors["final_conv.weight"].to(dtype)

    with pytest.raises(SchemaError, match=rf"tensor 'final_conv\.weight' has dtype {dtype}, expected torch.float32"):
        _decode(encode(tensors, _meta()), tiny_layout)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_named(bad: float, state, tiny_layout: PartLayout) -> None:
    tensors = _parts_of(state, tiny_layout, DECODER_ONLY)
    poisoned = tensors["final_conv.weight"].clone()
    poisoned.view(-1)[1] = bad
    tensors["final_conv.weight"] = poisoned

    with pytest.raises(NonFiniteTensor, match=r"tensor 'final_conv\.weight' holds 1 NaN/Inf") as excinfo:
        _decode(encode(tensors, _meta()), tiny_layout)

    assert excinfo.value.reason == "non_finite"


# --- metadata --------------------------------------------------------------------------------------------


def test_wrong_kind_is_refused(state, tiny_layout: PartLayout) -> None:
    data = encode(_parts_of(state, tiny_layout, DECODER_ONLY), _meta(kind="weights"))

    with pytest.raises(PayloadError, match="payload kind 'weights', expected 'delta'") as excinfo:
        _decode(data, tiny_layout, kind="delta")

    assert excinfo.value.reason == "not_safetensors"


def test_wrong_model_is_refused(state, tiny_layout: PartLayout) -> None:
    data = encode(_parts_of(state, tiny_layout, DECODER_ONLY), _meta(model="paper-fmnist"))

    with pytest.raises(SchemaError, match="model 'paper-fmnist', expected 'tiny'"):
        _decode(data, tiny_layout)


def test_wrong_round_is_refused(state, tiny_layout: PartLayout) -> None:
    data = encode(_parts_of(state, tiny_layout, DECODER_ONLY), _meta(wire_round=2))

    with pytest.raises(WrongRound, match="round 2, expected round 3") as excinfo:
        _decode(data, tiny_layout, wire_round=3)

    assert excinfo.value.reason == "wrong_round"
    assert isinstance(excinfo.value, RoundError)


def test_an_evaluation_payload_says_the_rounds_completed_not_a_round_index(state, tiny_layout: PartLayout) -> None:
    """The global model an evaluate task scores after 3 rounds: its payload's `round` metadata is the 3 rounds
    completed (the task's wire round), not the index 2 of the last round."""
    task = EvalTask(completed_rounds=3, task_id="e3-w", receives=DECODER_ONLY, private_parts=frozenset(), spec=SamplingSpec(num_samples=4))
    data = encode(_parts_of(state, tiny_layout, DECODER_ONLY), _meta(kind="weights", wire_round=task.wire_round))

    assert read_meta(data).wire_round == 3
    _decode(data, tiny_layout, kind="weights", wire_round=task.wire_round)
    with pytest.raises(WrongRound, match="round 3, expected round 2"):
        _decode(data, tiny_layout, kind="weights", wire_round=task.completed_rounds - 1)


@pytest.mark.parametrize(
    ("sent", "expected"),
    [(ALL_PARTS, DECODER_ONLY), (frozenset({MID, DEC}), DECODER_ONLY), (DECODER_ONLY, frozenset({MID, DEC}))],
)
def test_wrong_parts_are_not_assigned(sent, expected, state, tiny_layout: PartLayout) -> None:
    data = encode(_parts_of(state, tiny_layout, sent), _meta(sent))

    with pytest.raises(NotAssigned, match="payload holds parts") as excinfo:
        _decode(data, tiny_layout, parts=expected)

    assert excinfo.value.reason == "not_assigned"


def test_parts_metadata_must_match_the_tensors(state, tiny_layout: PartLayout) -> None:
    # Metadata claims the decoder, but the tensors are the bottleneck's.
    data = encode(_parts_of(state, tiny_layout, {MID}), _meta(DECODER_ONLY))

    with pytest.raises(SchemaError, match="unknown tensor 'mid_"):
        _decode(data, tiny_layout)


def test_round_and_model_checks_are_optional(state, tiny_layout: PartLayout) -> None:
    data = encode(_parts_of(state, tiny_layout, DECODER_ONLY), _meta(wire_round=99, model="tiny"))

    decoded = decode(data, tiny_layout, kind="delta", parts=DECODER_ONLY)

    assert set(decoded) == set(tiny_layout.names(DECODER_ONLY))


def test_payload_written_by_plain_safetensors_is_read(state, tiny_layout: PartLayout) -> None:
    tensors = {n: t.contiguous() for n, t in _parts_of(state, tiny_layout, DECODER_ONLY).items()}
    data = safetensors.torch.save(tensors, metadata=_meta().as_metadata())

    decoded = _decode(data, tiny_layout)

    assert all(torch.equal(decoded[n], tensors[n]) for n in tensors)


# --- the header memo: the same header is parsed once, and never trusted for another payload length ----------


def test_a_header_seen_before_is_not_parsed_again(state, tiny_layout: PartLayout, monkeypatch) -> None:
    from fedcore.payload import serialization

    data = encode(_parts_of(state, tiny_layout, DECODER_ONLY), _meta(wire_round=41))
    parses = []
    parse = serialization._parse_header

    def counted_parse(raw: bytes, n: int) -> serialization.Header:
        parses.append(n)
        return parse(raw, n)

    monkeypatch.setattr(serialization, "_parse_header", counted_parse)

    first = serialization.read_header(data)
    again = serialization.read_header(bytearray(data))

    assert len(parses) == 1 and again == first
    with pytest.raises(TypeError):
        first[1]["x"] = None  # type: ignore[index]  # shared with later reads: read-only


def test_a_remembered_header_is_checked_again_for_a_shorter_payload(state, tiny_layout: PartLayout) -> None:
    data = encode(_parts_of(state, tiny_layout, DECODER_ONLY), _meta(wire_round=42))
    _decode(bytearray(data), tiny_layout, wire_round=42)  # remembered now

    with pytest.raises(NotSafetensors, match="outside the payload"):
        _decode(bytearray(data[:-4]), tiny_layout, wire_round=42)


def test_checkpoint_files_are_read_back_by_the_safetensors_library(tmp_path) -> None:
    from safetensors import safe_open

    tensors = {
        "conv.weight": torch.randn(4, 3, 3, 3),
        "half": torch.randn(7).to(torch.bfloat16),
        "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(2.5),
        "strided": torch.arange(12, dtype=torch.int64).reshape(3, 4)[:, 1],  # not contiguous
    }
    path = tmp_path / "model.safetensors"

    save_file(path, tensors, {"completed_rounds": "7"})

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"completed_rounds": "7"}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t), name
    assert load_file(path)[1] == {"completed_rounds": "7"}


def _count_schema_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at each schema check a reader makes."""
    from fedcore.payload import serialization

    checks: list[int] = []
    check = serialization.check_schema

    def counted_check(*args: Any) -> None:
        checks.append(1)
        check(*args)

    monkeypatch.setattr(serialization, "check_schema", counted_check)
    return checks


def test_a_reader_checks_each_distinct_header_once(state, tiny_layout: PartLayout, monkeypatch) -> None:
    from fedcore.payload import serialization

    reader = serialization.PayloadReader(tiny_layout, kind="delta", wire_round=43, model="tiny")
    data = encode(_parts_of(state, tiny_layout, DECODER_ONLY), _meta(wire_round=43))
    checks = _count_schema_checks(monkeypatch)

    first = reader.read(bytearray(data), DECODER_ONLY)
    again = reader.read(bytearray(data), DECODER_ONLY)

    assert len(checks) == 1 and again.table is first.table
    assert sum(first.table.bytes_by_part.values()) == len(data)
    with pytest.raises(NotAssigned):  # the same header against other parts is checked, and refused
        reader.read(bytearray(data), frozenset({MID}))
    with pytest.raises(WrongRound):  # another round's reader
        serialization.PayloadReader(tiny_layout, kind="delta", wire_round=44).read(bytearray(data), DECODER_ONLY)


def test_a_reader_checks_the_values_of_every_payload(state, tiny_layout: PartLayout) -> None:
    from fedcore.payload import serialization

    reader = serialization.PayloadReader(tiny_layout, kind="delta", wire_round=45, model="tiny")
    tensors = _parts_of(state, tiny_layout, DECODER_ONLY)
    reader.read(bytearray(encode(tensors, _meta(wire_round=45))), DECODER_ONLY)  # its header is remembered now
    poisoned = dict(tensors, **{"final_conv.bias": tensors["final_conv.bias"].clone()})
    poisoned["final_conv.bias"][0] = float("inf")

    with pytest.raises(NonFiniteTensor, match=r"tensor 'final_conv\.bias' holds 1 NaN/Inf"):
        reader.read(bytearray(encode(poisoned, _meta(wire_round=45))), DECODER_ONLY)


def test_a_header_padded_past_the_memo_limit_is_read_but_not_kept(state, tiny_layout: PartLayout, monkeypatch) -> None:
    from fedcore.payload import serialization

    data = encode(_parts_of(state, tiny_layout, DECODER_ONLY), _meta(wire_round=46))
    (n,) = struct.unpack("<Q", data[:8])
    pad = serialization.MEMO_HEADER_BYTES + 8  # JSON allows trailing spaces; the data offsets do not move
    padded = struct.pack("<Q", n + pad) + data[8 : 8 + n] + b" " * pad + data[8 + n :]
    reader = serialization.PayloadReader(tiny_layout, kind="delta", wire_round=46, model="tiny")
    checks = _count_schema_checks(monkeypatch)

    first = reader.read(bytearray(padded), DECODER_ONLY)
    again = reader.read(bytearray(padded), DECODER_ONLY)

    assert len(checks) == 2 and again.table is not first.table
    assert all(torch.equal(t, state[name]) for name, t in again.tensors().items())


# --- the size bound both ends check a stream's declared size against ------------------------------------------
@pytest.mark.parametrize("kind", ["weights", "delta"])
@pytest.mark.parametrize("parts", [ALL_PARTS, frozenset({ENC}), frozenset({MID}), DECODER_ONLY, frozenset({MID, DEC})])
def test_a_payload_of_parts_is_within_their_bound(parts: frozenset[Part], kind: str, state, tiny_layout: PartLayout) -> None:
    data = encode(_parts_of(state, tiny_layout, parts), _meta(parts, kind=kind, wire_round=2**31 - 1))

    values = 4 * sum(tiny_layout.sizes[p] for p in parts)
    assert values < len(data) <= max_payload_bytes(tiny_layout, parts) < values + (1 << 20)


def _entry_bytes(name: str, shape: tuple[int, ...], total: int) -> int:
    """The bytes of one tensor's entry in a safetensors header (as the library writes it: compact JSON, a comma)."""
    entry = {"dtype": "F32", "shape": list(shape), "data_offsets": [total, total]}
    return len(json.dumps(name)) + 1 + len(json.dumps(entry, separators=(",", ":"))) + 1


def test_the_entries_of_a_header_are_measured_as_safetensors_writes_them(state, tiny_layout: PartLayout) -> None:
    data = encode(_parts_of(state, tiny_layout, ALL_PARTS), _meta(ALL_PARTS))
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    metadata = len(json.dumps({"__metadata__": header.pop("__metadata__")}, separators=(",", ":")))

    measured = sum(_entry_bytes(name, tuple(e["shape"]), e["data_offsets"][1]) for name, e in header.items())

    assert measured - 8 < n - metadata <= measured + 8  # up to the alignment padding; the offsets' widths vary


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_tensor_of_every_preset_fits_the_header_bytes_allowed_per_tensor(name: str) -> None:
    if isinstance(preset(name), DiffusersUNetConfig):
        pytest.importorskip("diffusers", reason="the diffusers extra is not installed: pip install 'feddiff[diffusers]'")
    with torch.device("meta"):
        layout = layout_of(build_model(name))
    total = 4 * sum(layout.sizes.values())

    longest = max(_entry_bytes(n, spec.shape, total) for n, spec in layout.specs(ALL_PARTS).items())

    assert longest <= HEADER_BYTES_PER_TENSOR / 2, f"{name}: a header entry of {longest} bytes"
