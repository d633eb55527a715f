"""Coded deltas (fedcore.payload.codecs) <-> safetensors payloads, every field checked before use.

A coded payload holds each tensor's coded parts as named tensors, "<tensor>/<role>" ("ups.0.0.weight/codes",
".../absmax", ".../indices"), and names its codec in the metadata ("codec": "int8"). The receiver derives the
names, dtypes and lengths from its own layout and the codec the run chose, never from the payload: a payload
of another codec is refused (CodecSpecError) before its tensors are looked at, then its schema (SchemaError),
then every field of every tensor (`Codec.decode_all`: NonFiniteTensor, BadScale, CodeOutOfRange, BadIndices),
then the decoded values' magnitude (ValueOutOfBounds). A `none` run sends plain float32 payloads
(fedcore.payload.serialization), byte for byte as a run without compression.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch

from fedcore.model.parts import Part, PartLayout, TensorSpec
from fedcore.payload import serialization
from fedcore.payload.codecs import Codec, Encoded, Identity
from fedcore.payload.serialization import HEADER_BYTES_PER_TENSOR, HEADER_SLACK, PayloadMeta, PayloadReader, check_magnitude, check_schema

SEPARATOR = "/"  # between a tensor's name and its role


def coded_name(name: str, role: str) -> str:
    return f"{name}{SEPARATOR}{role}"


def tensor_of(key: str) -> str:
    """The model tensor a payload's tensor belongs to: "<tensor>" of "<tensor>/<role>", a plain payload's name as it is."""
    return key.rpartition(SEPARATOR)[0] if SEPARATOR in key else key


def tensor_bytes(entries: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """A payload's bytes per model tensor, from its (begin, end) byte range per payload tensor."""
    sizes: dict[str, int] = {}
    for key, (begin, end) in entries.items():
        sizes[tensor_of(key)] = sizes.get(tensor_of(key), 0) + end - begin
    return sizes


def coded_specs(layout: PartLayout, parts: Iterable[Part], codec: Codec) -> dict[str, TensorSpec]:
    """What a payload of `parts` coded by `codec` holds: "<tensor>/<role>" -> shape and dtype, in the layout's order."""
    return {coded_name(name, role): s for name, spec in layout.specs(parts).items() for role, s in codec.layout(spec.numel).items()}


def max_payload_bytes(layout: PartLayout, parts: Iterable[Part], codec: Codec) -> int:
    """The most bytes a delta payload of `parts` coded by `codec` takes (its coded tensors and the safetensors
    header that describes them): the bound the coordinator puts on an update's declared size."""
    if isinstance(codec, Identity):
        return serialization.max_payload_bytes(layout, parts)
    roles = len(codec.layout(1))
    specs = layout.specs(parts).values()
    return sum(codec.encoded_bytes(s.numel) + HEADER_BYTES_PER_TENSOR * roles for s in specs) + HEADER_SLACK


def max_download_bytes(layout: PartLayout, parts: Iterable[Part], codec: Codec) -> int:
    """The most bytes a task's download of `parts` takes in a run whose deltas `codec` codes: the values
    (to a worker that holds no earlier version) or a change coded by `codec` (to one that does), whichever
    may be larger (top-k of every value takes more than the values). The bound a worker puts on the declared
    size of its download, as `max_payload_bytes` is the coordinator's on an update."""
    return max(serialization.max_payload_bytes(layout, parts), max_payload_bytes(layout, parts, codec))


def encode(deltas: Mapping[str, torch.Tensor], meta: PayloadMeta, encoded: Mapping[str, Encoded] | None = None) -> bytes:
    """The payload of `deltas` as `meta.codec` codes them (`encoded`: their coded form, when the caller has it,
    as error feedback does); plain float32 for "none"."""
    codec = Codec.parse(meta.codec)
    if isinstance(codec, Identity):
        return serialization.encode(deltas, meta)
    encoded = codec.encode_all(deltas) if encoded is None else encoded
    tensors = {coded_name(name, role): t for name, e in encoded.items() for role, t in e.tensors.items()}
    return serialization.encode(tensors, replace(meta, codec=codec.name))


def decode(
    reader: PayloadReader, codec: Codec, data: bytes | bytearray | memoryview, parts: Iterable[Part], *, max_magnitude: float = math.inf
) -> tuple[dict[str, torch.Tensor], dict[Part, int]]:
    """The float32 tensors of a payload coded by `codec` that must hold exactly `parts` of `reader`'s layout,
    in the layout's order, and its size split over the parts; every check of the module docstring first, and
    those of the reader's metadata (kind, model, round, parts). The tensors are a fresh buffer of their own."""
    parts = frozenset(parts)
    layout = reader.layout
    metadata, entries, offset = serialization.read_header(data)
    reader.check_meta(PayloadMeta.from_metadata(metadata), parts, codec.name)
    check_schema({n: (e.dtype, e.shape) for n, e in entries.items()}, coded_specs(layout, parts, codec))
    view = memoryview(data)
    buffer = data if isinstance(data, bytearray) else bytearray(view)  # torch.frombuffer wants writable memory
    shapes = {name: spec.shape for name, spec in layout.specs(parts).items()}
    coded: dict[str, dict[str, torch.Tensor]] = {name: {} for name in shapes}
    for key, e in entries.items():
        name, _, role = key.rpartition(SEPARATOR)
        count = (e.end - e.begin) // e.dtype.itemsize
        coded[name][role] = torch.frombuffer(buffer, dtype=e.dtype, count=count, offset=offset + e.begin) if count else torch.empty(0, dtype=e.dtype)
    tensors = codec.decode_all(coded, shapes)
    if max_magnitude < math.inf:
        check_magnitude(tensors, max_magnitude)
    return tensors, layout.split_bytes(len(view), tensor_bytes({k: (e.begin, e.end) for k, e in entries.items()}))
