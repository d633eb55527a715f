"""Delta codecs: float32 tensors <-> a few named 1-D tensors each and a small JSON-able spec, checked before use.

A codec turns a tensor of any shape, read in its logical (row-major) order as n elements, into named tensors
(its *roles*) whose dtypes and lengths follow from the codec and n alone (`Codec.layout`): a receiver derives
them from the shape it expects, never from the payload. The schemes, by name (`Codec.parse`):

  none               the float32 values ("values", 4n bytes)
  bf16               the values rounded to the nearest bfloat16, ties to even ("values", 2n bytes; relative
                     error <= 2^-8). bfloat16: Kalamkar et al. 2019, "A Study of BFLOAT16 for Deep Learning
                     Training"
  int8[:B], int4[:B] blockwise absmax quantization (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
                     Quantization"): the flattened tensor in blocks of B consecutive elements (default 64, the
                     last block partial), one float32 "absmax" per block (its largest |value|), and per element
                     the "codes" round(x / absmax * Q), to nearest with ties to even, in -Q..Q with Q = 127
                     (int8) or 7 (int4); x decodes as code * absmax / Q, within absmax / (2Q) of the original.
                     int8: n + 4 ceil(n/B) bytes; int4 packs two codes per uint8: ceil(n/2) + 4 ceil(n/B)
  topk:F[+V]         the ceil(F n) largest-magnitude elements (F in (0, 1]): their flat "indices" (int32, or
                     int64 for tensors of more than 2^31 elements), strictly increasing, and their values as
                     codec V (none: float32 "values"; bf16; int8[:B] or int4[:B] over the k kept values); every
                     other element decodes to zero (Aji and Heafield 2017, "Sparse Communication for Distributed
                     Gradient Descent"; with error feedback, below: Stich et al. 2018, "Sparsified SGD with
                     Memory")

The blocks and scales are laid out as bitsandbytes lays out its blockwise state (`quantize_blockwise`,
`quantize_4bit`: one float32 absmax per block of the flattened tensor, in block order, the last block partial;
4-bit codes packed two per byte, the first element in the high nibble), which NVIDIA FLARE's quantization
filters send as each tensor's quantization state. Unlike both, the codes here are linear (uniform steps of
absmax / Q, no code table travels), and a decoder checks every field before use.

A receiver's checks, each naming the tensor, the field and the offending value: the roles,
dtypes and lengths the codec gives for n elements (SchemaError); float fields finite (NonFiniteTensor);
scales not negative (BadScale); top-k indices strictly increasing within [0, n), so none is repeated or out
of range (BadIndices); codes within -Q..Q and an odd int4 tensor's padding nibble zero (CodeOutOfRange); each
block's scale consistent with its codes (BadScale: an absmax is zero exactly when all its block's codes are
zero, and otherwise its block's largest |code| is Q, which is what the encoder always writes: the element x
with |x| = absmax gives x / absmax = +-1 exactly). A block's absmax is therefore its largest decoded |value| (to
float32 rounding), so a bound on an update's values can be checked on the scales alone.

Many tensors are coded in one pass (`encode_all`, `decode_all`): a model's 220 tensors cost a few dozen
operations rather than a few dozen each, and each tensor is checked as if alone (a tensor is padded to whole
blocks, so no block spans two tensors). Everything is vectorised torch, with no Python loop over elements or
blocks, and runs where the tensors are, CPU or CUDA. What a lossy codec drops is carried into the next round by
`fedcore.payload.feedback`.
"""

from __future__ import annotations

import itertools
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Annotated, Any, ClassVar, Literal, NoReturn

import torch
from annotated_types import Interval
from pydantic import AfterValidator

from fedcore import settings
from fedcore.errors import BadIndices, BadScale, CodecSpecError, CodeOutOfRange, NonFiniteTensor, SchemaError
from fedcore.model.parts import TensorSpec
from fedcore.payload.serialization import check_schema, largest_magnitude

DEFAULT_BLOCK = 64  # elements per scale of int8 / int4 (bitsandbytes' smallest block, QLoRA's 4-bit block)
MAX_BLOCK = 1 << 20  # the largest block a codec name may give
MAX_INT32_ELEMENTS = 1 << 31  # top-k indices are int32 up to this many elements, int64 beyond
MAX_NAME = 64  # characters of a codec name; longer ones are refused unread
_SAMPLE = 1 << 14  # elements sampled to narrow a large top-k (`_largest`)

_GRAMMAR = f"none, bf16, int8[:B], int4[:B] or topk:F[+bf16|+int8[:B]|+int4[:B]] (B a block size in 1..{MAX_BLOCK}, F a fraction in (0, 1] written with digits and a point, as 0.05 or 1)"
_BLOCK = re.compile(r"[1-9][0-9]{0,6}")
_FRACTION = re.compile(r"[0-9]{1,3}(\.[0-9]{1,12})?")

Roles = Mapping[str, torch.Tensor]  # one tensor in coded form: role -> 1-D tensor


class Codec(ABC):
    """A delta codec: float32 tensors <-> named 1-D tensors each (`layout`). Frozen, compared and hashed by
    value; `str()` is its canonical name, which `Codec.parse` reads back."""

    @staticmethod
    def parse(name: str) -> Codec:
        """The codec a name gives ("int8", "int8:128", "topk:0.05", "topk:0.05+int8"); ValueError naming the
        string for anything else."""
        if not isinstance(name, str) or len(name) > MAX_NAME:
            raise ValueError(f"unknown codec {str(name)[:MAX_NAME]!r} (a name is a string of at most {MAX_NAME} characters): expected {_GRAMMAR}")
        head, plus, tail = name.partition("+")
        try:
            if head.startswith("topk:"):
                return TopK(_parse_fraction(head.removeprefix("topk:")), _parse_values(tail) if plus else Identity())
            if not plus:
                return _parse_plain(head)
        except ValueError:
            pass
        raise ValueError(f"unknown codec {name!r}: expected {_GRAMMAR}")

    @property
    @abstractmethod
    def name(self) -> str:
        """The canonical name ("int8", not "int8:64")."""

    def __str__(self) -> str:
        return self.name

    @abstractmethod
    def layout(self, numel: int) -> dict[str, TensorSpec]:
        """The 1-D tensors (role -> shape and dtype) a tensor of `numel` elements is coded as, in this order."""

    @abstractmethod
    def encoded_bytes(self, numel: int) -> int:
        """The bytes of the coded tensors of `numel` elements (the container's header not counted), in closed form."""

    def encode(self, tensor: torch.Tensor, *, name: str = "tensor") -> Encoded:
        """The coded form of one tensor (`encode_all`)."""
        return self.encode_all({name: tensor})[name]

    def encode_all(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, Encoded]:
        """The coded form of each float32 tensor (any shape, read in its logical order: a channels_last tensor
        reads as its NCHW self), on the tensors' device (one for all). ValueError naming the tensor for another
        dtype or a NaN/Inf value. The coded tensors may be views of buffers they share (safetensors writes them
        apart); `none` and a topk:1 of float32 values share the input's memory."""
        if not tensors:
            return {}
        for name, t in tensors.items():
            if t.dtype != torch.float32:
                raise ValueError(f"{name!r} is {t.dtype}; codecs take float32 tensors")
        flats = [t.detach().reshape(-1) for t in tensors.values()]  # (shape) -> (n,), a view when contiguous
        if not math.isfinite(_largest_of(flats)):
            for name, flat in zip(tensors, flats, strict=True):
                if not math.isfinite(largest_magnitude(flat)):
                    raise ValueError(f"{name!r} holds {int((~torch.isfinite(flat)).sum())} NaN/Inf values; a codec codes finite tensors only")
        coded = self._encode_all(flats, list(tensors))
        return {name: Encoded(self, tuple(t.shape), roles) for (name, t), roles in zip(tensors.items(), coded, strict=True)}

    def decode(self, tensors: Roles, shape: Sequence[int], *, name: str = "tensor") -> torch.Tensor:
        """One tensor from its coded form (`decode_all`)."""
        return self.decode_all({name: tensors}, {name: shape})[name]

    def decode_all(self, coded: Mapping[str, Roles], shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
        """The float32 tensor of each name of `shapes` (the receiver's, never the payload's), from its coded form
        in `coded` (on one device), once every field of every tensor is checked (module docstring): SchemaError,
        NonFiniteTensor, BadScale, BadIndices or CodeOutOfRange, naming the tensor. Views of one buffer they
        share, in the order of `shapes`; `none` decodes to views of its "values"."""
        if set(coded) != set(shapes):
            unknown, missing = sorted(set(coded) - set(shapes)), [name for name in shapes if name not in coded]
            raise SchemaError(f"unknown tensor {unknown[0][:200]!r}" if unknown else f"missing tensor {missing[0]!r}")
        if not shapes:
            return {}
        numels = [math.prod(shape) for shape in shapes.values()]
        for name, numel in zip(shapes, numels, strict=True):
            self._check_layout(coded[name], numel, name)
        flats = self._decode_all([coded[name] for name in shapes], numels, [f"{name!r} ({self})" for name in shapes])
        return {name: flat.view(tuple(shape)) for (name, shape), flat in zip(shapes.items(), flats, strict=True)}

    def _check_layout(self, tensors: Roles, numel: int, name: str) -> None:
        """SchemaError naming the tensor unless its coded tensors are the roles, dtypes and shapes of `layout`."""
        try:
            check_schema({role: (t.dtype, tuple(t.shape)) for role, t in tensors.items()}, self.layout(numel))
        except SchemaError as e:
            raise SchemaError(f"{name!r} ({self}, {numel} elements): coded {e}") from None

    @abstractmethod
    def _encode_all(self, flats: list[torch.Tensor], names: list[str]) -> list[dict[str, torch.Tensor]]:
        """(n_i,) finite float32 tensors -> the coded tensors of each, as `layout(n_i)` gives them."""

    @abstractmethod
    def _decode_all(self, coded: list[Roles], numels: list[int], wheres: list[str]) -> list[torch.Tensor]:
        """Coded tensors of checked layouts -> the (n_i,) float32 values of each, once every field is checked:
        what the codec never writes is refused, the message starting with the tensor's `wheres[i]`."""


@dataclass(frozen=True)
class Encoded:
    """One tensor in coded form: what travels (`tensors`, `spec()`) and how to read it back."""

    codec: Codec
    shape: tuple[int, ...]  # the original tensor's shape
    tensors: Roles  # role -> 1-D tensor, as `codec.layout(numel)` gives them

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def spec(self) -> dict[str, object]:
        """What the receiver needs besides the tensors, JSON-able: {"codec": name, "shape": [dims]}."""
        return {"codec": self.codec.name, "shape": list(self.shape)}

    def decode(self, *, name: str = "tensor") -> torch.Tensor:
        return self.codec.decode(self.tensors, self.shape, name=name)


def read_spec(spec: object, *, shape: Sequence[int], expected: Codec | None = None, name: str = "tensor") -> Codec:
    """The codec a received spec names, checked: CodecSpecError when it is not {"codec": str, "shape": [int]},
    names no codec or another than `expected`; SchemaError when its shape is not `shape` (the receiver's)."""
    if not isinstance(spec, Mapping) or set(spec) != {"codec", "shape"}:
        raise CodecSpecError(f"{name!r} has a malformed codec spec {str(spec)[:200]}; expected {{'codec': name, 'shape': [dims]}}")
    codec_name, dims = spec["codec"], spec["shape"]
    try:
        codec = Codec.parse(codec_name)
    except ValueError as e:
        raise CodecSpecError(f"{name!r}: {e}") from None
    if expected is not None and codec != expected:
        raise CodecSpecError(f"{name!r} is coded as {codec}, expected {expected}")
    if not isinstance(dims, list) or not all(type(d) is int and d >= 0 for d in dims):
        raise CodecSpecError(f"{name!r} has a malformed shape {str(dims)[:200]} in its codec spec")
    if tuple(dims) != tuple(shape):
        raise SchemaError(f"{name!r} has shape {tuple(dims)}, expected {tuple(shape)}")
    return codec


def decode(spec: object, tensors: Roles, *, shape: Sequence[int], expected: Codec | None = None, name: str = "tensor") -> torch.Tensor:
    """A received tensor: its spec checked (`read_spec`), then its coded tensors (`Codec.decode`)."""
    return read_spec(spec, shape=shape, expected=expected, name=name).decode(tensors, shape, name=name)


# --- the codecs --------------------------------------------------------------------------------------------


class _Dense(Codec):
    """Every value, in `dtype`: one role, "values", (n,)."""

    dtype: ClassVar[torch.dtype]

    def layout(self, numel: int) -> dict[str, TensorSpec]:
        return {"values": TensorSpec((numel,), self.dtype)}

    def encoded_bytes(self, numel: int) -> int:
        return numel * self.dtype.itemsize

    def _decode_all(self, coded: list[Roles], numels: list[int], wheres: list[str]) -> list[torch.Tensor]:
        values = [roles["values"] for roles in coded]
        _check_finite(values, wheres, "values")
        if self.dtype == torch.float32:
            return values  # the received tensors themselves
        return list(_concat(values, numels).to(torch.float32).split(numels))


@dataclass(frozen=True)
class Identity(_Dense):
    """`none`: the float32 values."""

    dtype = torch.float32

    @property
    def name(self) -> str:
        return "none"

    def _encode_all(self, flats: list[torch.Tensor], names: list[str]) -> list[dict[str, torch.Tensor]]:
        return [{"values": flat} for flat in flats]


@dataclass(frozen=True)
class BFloat16(_Dense):
    """`bf16`: the values rounded to the nearest bfloat16 (ties to even), 8 significant bits."""

    dtype = torch.bfloat16

    @property
    def name(self) -> str:
        return "bf16"

    def _encode_all(self, flats: list[torch.Tensor], names: list[str]) -> list[dict[str, torch.Tensor]]:
        values = [flat.to(torch.bfloat16) for flat in flats]
        if not math.isfinite(_largest_of(values)):  # finite float32 beyond bfloat16's largest, 3.39e38
            name, flat = next((n, f) for n, f, v in zip(names, flats, values, strict=True) if not math.isfinite(largest_magnitude(v)))
            raise ValueError(f"{name!r} holds a value of magnitude {largest_magnitude(flat):.4g}, beyond bfloat16's range")
        return [{"values": v} for v in values]


@dataclass(frozen=True)
class Blockwise(Codec):
    """`int8[:B]` and `int4[:B]`: blockwise absmax quantization (module docstring).

    Roles for n elements: "codes", int8 (n,) in -127..127, or for int4 uint8 (ceil(n/2),) holding element 2i
    in the high nibble and 2i+1 in the low one as 4-bit two's complement (-7..7; an odd n pads the last low
    nibble with 0); "absmax", float32 (ceil(n/B),), the largest |value| of each block.

    A batch is coded as one zero-padded buffer: each tensor padded to a multiple of `unit` elements (whole
    blocks, an even count for int4), so its blocks, scales and packed bytes are those it has alone (a zero
    does not change a block's absmax) and a tensor's coded tensors are slices of the batch's."""

    bits: Literal[8, 4] = 8
    block: int = DEFAULT_BLOCK  # elements per scale

    def __post_init__(self) -> None:
        if self.bits not in (8, 4):
            raise ValueError(f"a blockwise codec has 8 or 4 bits, not {self.bits!r}")
        if type(self.block) is not int or not 1 <= self.block <= MAX_BLOCK:
            raise ValueError(f"block size {self.block!r} is not an integer in 1..{MAX_BLOCK}")

    @property
    def name(self) -> str:
        return f"int{self.bits}" + (f":{self.block}" if self.block != DEFAULT_BLOCK else "")

    @property
    def qmax(self) -> int:
        """Q: codes lie in -Q..Q."""
        return (1 << (self.bits - 1)) - 1

    @property
    def unit(self) -> int:
        """What each tensor of a batch is padded to a multiple of: whole blocks, and for int4 whole bytes."""
        return self.block if self.bits == 8 or self.block % 2 == 0 else 2 * self.block

    def blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def _code_count(self, numel: int) -> int:
        """Elements of "codes" for `numel` values: one each, or one byte per two for int4."""
        return numel if self.bits == 8 else -(-numel // 2)

    def layout(self, numel: int) -> dict[str, TensorSpec]:
        codes = TensorSpec((numel,), torch.int8) if self.bits == 8 else TensorSpec((self._code_count(numel),), torch.uint8)
        return {"codes": codes, "absmax": TensorSpec((self.blocks(numel),), torch.float32)}

    def encoded_bytes(self, numel: int) -> int:
        return self._code_count(numel) + 4 * self.blocks(numel)

    def _encode_all(self, flats: list[torch.Tensor], names: list[str]) -> list[dict[str, torch.Tensor]]:
        numels = [flat.numel() for flat in flats]
        padded = [-(-n // self.unit) * self.unit for n in numels]
        values = _concat(flats, padded).view(-1, self.block)  # (blocks, B), each tensor in whole blocks
        absmax = torch.maximum(values.amax(dim=1), values.amin(dim=1).neg_())  # (blocks,)
        divisor = absmax.masked_fill(absmax == 0, 1.0).unsqueeze(1)  # an all-zero block codes as zeros
        # x / absmax is in [-1, 1], and exactly +-1 for the block's largest |x|, whose code is therefore +-Q
        codes = torch.div(values, divisor).mul_(self.qmax).round_().to(torch.int8).view(-1)  # (elements,)
        stored = codes if self.bits == 8 else _pack_nibbles(codes)
        out = []
        for n, start in zip(numels, _starts(padded), strict=True):
            first_code = start if self.bits == 8 else start // 2
            first_block = start // self.block
            out.append({"codes": stored[first_code : first_code + self._code_count(n)], "absmax": absmax[first_block : first_block + self.blocks(n)]})
        return out

    def _decode_all(self, coded: list[Roles], numels: list[int], wheres: list[str]) -> list[torch.Tensor]:
        absmax_parts = [roles["absmax"] for roles in coded]
        _check_finite(absmax_parts, wheres, "absmax")
        padded = [-(-n // self.unit) * self.unit for n in numels]
        absmax = _concat(absmax_parts, [p // self.block for p in padded])  # (blocks,) zero-scaled padding blocks
        if absmax.numel() and float(absmax.min()) < 0:
            where, part = next((w, a) for w, a in zip(wheres, absmax_parts, strict=True) if a.numel() and float(a.min()) < 0)
            i = _first(part < 0)
            raise BadScale(f"{where}: absmax[{i}] is {float(part[i]):.6g}; a block's absmax is its largest |value|, never negative")
        stored = _concat([roles["codes"] for roles in coded], [self._code_count(p) for p in padded])
        if self.bits == 4:
            self._check_padding(stored, numels, padded, wheres)
        codes = (stored if self.bits == 8 else _unpack_nibbles(stored)).to(torch.float32).view(-1, self.block)  # (blocks, B)
        peak = torch.maximum(codes.amax(dim=1), codes.amin(dim=1).neg_())  # each block's largest |code|, > Q for a code < -Q
        if not bool((peak == (absmax > 0) * float(self.qmax)).all()):  # Q for a positive absmax, 0 for a zero one
            self._refuse_codes(codes.view(-1), absmax, peak, numels, padded, wheres)
        values = codes.mul_((absmax / self.qmax).unsqueeze(1)).view(-1)  # codes * the value of one step, in place
        return [values[start : start + n] for n, start in zip(numels, _starts(padded), strict=True)]

    def _check_padding(self, stored: torch.Tensor, numels: list[int], padded: list[int], wheres: list[str]) -> None:
        """CodeOutOfRange for an odd int4 tensor whose last byte's low nibble is not the zero it pads with."""
        odd = [(n, start // 2 + n // 2, where) for n, start, where in zip(numels, _starts(padded), wheres, strict=True) if n % 2]
        if not odd:
            return
        nibbles = stored[torch.tensor([at for _, at, _ in odd], device=stored.device)] & 0xF
        if bool(nibbles.any()):
            i = _first(nibbles != 0)
            n, _, where = odd[i]
            raise CodeOutOfRange(f"{where}: the padding nibble after element {n - 1} is {int(nibbles[i])}, expected 0")

    def _refuse_codes(self, codes: torch.Tensor, absmax: torch.Tensor, peak: torch.Tensor, numels: list[int], padded: list[int], wheres: list[str]) -> NoReturn:
        """The error for the first tensor whose codes or scales are inconsistent (CodeOutOfRange, then BadScale)."""
        starts = list(_starts(padded))
        low = codes < -self.qmax
        if bool(low.any()):
            at = _first(low)
            t = next(i for i, start in enumerate(starts) if start <= at < start + padded[i])
            raise CodeOutOfRange(f"{wheres[t]}: code {int(codes[at])} at element {at - starts[t]} is outside -{self.qmax}..{self.qmax}")
        block = _first(peak != (absmax > 0) * float(self.qmax))
        t = next(i for i, start in enumerate(starts) if start <= block * self.block < start + padded[i])
        raise BadScale(
            f"{wheres[t]}: block {block - starts[t] // self.block} has absmax {float(absmax[block]):.6g} and a largest |code| of "
            f"{int(peak[block])}; expected {self.qmax} for a positive absmax, 0 for a zero one"
        )


@dataclass(frozen=True)
class TopK(Codec):
    """`topk:F[+V]`: the k = ceil(F n) largest-magnitude elements (module docstring); ties at the k-th magnitude
    are broken by torch.topk. k is computed exactly from F's decimal digits (topk:0.05 keeps 5 of 100 elements,
    where float arithmetic, 0.05 * 100 = 5.000000000000001, would round up to 6); a non-empty tensor keeps at
    least one. Roles for n elements: "indices", int32 (int64 beyond 2^31 elements) (k,), strictly increasing;
    then V's roles for the k kept values, in index order."""

    fraction: Decimal  # F, in (0, 1]
    values: Identity | BFloat16 | Blockwise = field(default_factory=Identity)  # how the kept values travel

    def __post_init__(self) -> None:
        if not isinstance(self.fraction, Decimal) or not self.fraction.is_finite() or not 0 < self.fraction <= 1:
            raise ValueError(f"top-k fraction {self.fraction!r} is not a decimal in (0, 1]")
        if not isinstance(self.values, (Identity, BFloat16, Blockwise)):
            raise ValueError(f"top-k values cannot be coded as {self.values!r}")

    @property
    def name(self) -> str:
        suffix = "" if isinstance(self.values, Identity) else f"+{self.values}"
        return f"topk:{self.fraction.normalize():f}{suffix}"

    def kept(self, numel: int) -> int:
        """k = ceil(F n), exactly."""
        f = Fraction(self.fraction)
        return -(-numel * f.numerator // f.denominator)

    @staticmethod
    def index_dtype(numel: int) -> torch.dtype:
        return torch.int32 if numel <= MAX_INT32_ELEMENTS else torch.int64

    def layout(self, numel: int) -> dict[str, TensorSpec]:
        k = self.kept(numel)
        return {"indices": TensorSpec((k,), self.index_dtype(numel)), **self.values.layout(k)}

    def encoded_bytes(self, numel: int) -> int:
        k = self.kept(numel)
        return k * self.index_dtype(numel).itemsize + self.values.encoded_bytes(k)

    def _encode_all(self, flats: list[torch.Tensor], names: list[str]) -> list[dict[str, torch.Tensor]]:
        indices, kept = [], []
        for flat in flats:  # one selection per tensor: k = ceil(F n) of each
            n, k = flat.numel(), self.kept(flat.numel())
            chosen = torch.arange(n, device=flat.device) if k == n else _largest(flat.abs(), k)  # (k,) increasing
            indices.append(chosen.to(self.index_dtype(n)))
            kept.append(flat if k == n else flat[chosen])
        return [{"indices": i, **roles} for i, roles in zip(indices, self.values._encode_all(kept, names), strict=True)]

    def _decode_all(self, coded: list[Roles], numels: list[int], wheres: list[str]) -> list[torch.Tensor]:
        parts = [roles["indices"] for roles in coded]
        counts = [p.numel() for p in parts]
        indices = _concat([p.to(torch.int64) for p in parts], counts)  # (K,) each tensor's, in turn
        device = indices.device
        starts = torch.tensor(list(_starts(numels)), dtype=torch.int64, device=device)
        if indices.numel():
            ends = torch.tensor(numels, dtype=torch.int64, device=device)
            kept = torch.tensor(counts, device=device) > 0
            last = torch.tensor(list(itertools.accumulate(counts)), device=device)[kept] - 1  # (tensors with k > 0,)
            first = last - torch.tensor(counts, device=device)[kept] + 1
            # strictly increasing within each tensor and each tensor's first and last within [0, n)
            step = indices[1:] > indices[:-1]
            step[last[:-1]] = True  # no order between one tensor's last index and the next one's first
            if not bool(step.all()) or bool((indices[first] < 0).any()) or bool((indices[last] >= ends[kept]).any()):
                for part, n, where in zip(parts, numels, wheres, strict=True):
                    _check_indices(part, n, where)
                raise AssertionError("the indices failed the batch's check and passed each tensor's")
        values = self.values._decode_all(coded, counts, [f"{where}, kept values" for where in wheres])
        out = torch.zeros(sum(numels), dtype=torch.float32, device=device)
        out[indices + torch.repeat_interleave(starts, torch.tensor(counts, device=device))] = _concat(values, counts)
        return list(out.split(numels))


# --- parsing -----------------------------------------------------------------------------------------------

_PLAIN: dict[str, Identity | BFloat16] = {"none": Identity(), "bf16": BFloat16()}


def _parse_plain(name: str) -> Identity | BFloat16 | Blockwise:
    scheme, colon, block = name.partition(":")
    if not colon and scheme in _PLAIN:
        return _PLAIN[scheme]
    if scheme in ("int8", "int4"):
        bits: Literal[8, 4] = 8 if scheme == "int8" else 4
        if not colon:
            return Blockwise(bits)
        if _BLOCK.fullmatch(block):
            return Blockwise(bits, int(block))
    raise ValueError(name)


def _parse_values(name: str) -> BFloat16 | Blockwise:
    codec = _parse_plain(name)
    if isinstance(codec, Identity):  # "topk:F" already says float32 values
        raise ValueError(name)
    return codec


def _parse_fraction(text: str) -> Decimal:
    if not _FRACTION.fullmatch(text):
        raise ValueError(text)
    try:
        return Decimal(text)
    except InvalidOperation:
        raise ValueError(text) from None


def compression_codec(name: str, block: int = 0) -> Codec:
    """The codec of a run's `compression` and `compression_block` settings: `name` parsed (`Codec.parse`), and
    with `block` > 0 that block size for its blockwise part (int8 / int4, alone or as top-k's values).
    ValueError naming the values when `block` has no blockwise part to apply to, or the name gives another."""
    codec = Codec.parse(name)
    if block == 0:
        return codec
    blockwise = codec.values if isinstance(codec, TopK) else codec
    if not isinstance(blockwise, Blockwise):
        raise ValueError(f"compression_block {block} is given, but codec {name!r} has no int8 or int4 blocks")
    if ":" in name.partition("+")[2 if isinstance(codec, TopK) else 0] and blockwise.block != block:
        raise ValueError(f"codec {name!r} names block size {blockwise.block}, compression_block {block}: give one")
    sized = Blockwise(blockwise.bits, block)
    return TopK(codec.fraction, sized) if isinstance(codec, TopK) else sized


def _checked_name(name: str) -> str:
    Codec.parse(name)
    return name


def settle_compression(config: Any) -> None:
    """Put a frozen config's `compression` and `compression_block` settings (a config without the block setting:
    its codec name alone) in their one spelling, as its `__post_init__` settles them: the block folded into the
    codec's name, which drops the default ("int8:64" and ("int8", 64) become ("int8", 0); ("int8", 32)
    ("int8:32", 0)). ValueError as `compression_codec`."""
    has_block = hasattr(config, "compression_block")
    name = compression_codec(config.compression, config.compression_block if has_block else 0).name
    object.__setattr__(config, "compression", name)  # a frozen dataclass: its own settled value
    if has_block:
        object.__setattr__(config, "compression_block", 0)


# A run's `compression` setting: a codec name as given, checked; the config that holds it keeps it in its
# one spelling with its block (`settle_compression`), once the block setting is seen beside it
CompressionName = Annotated[str, AfterValidator(_checked_name), settings.Described("a codec name")]
CompressionBlock = Annotated[int, Interval(ge=0, le=MAX_BLOCK)]  # int8 / int4 elements per scale; 0: the codec name's (64 unless it says)


# --- vectorised helpers ------------------------------------------------------------------------------------


def _starts(sizes: Sequence[int]) -> itertools.accumulate[int]:
    """Where each of consecutive parts of `sizes` starts."""
    return itertools.accumulate(sizes[:-1], initial=0)


def _concat(parts: Sequence[torch.Tensor], sizes: Sequence[int]) -> torch.Tensor:
    """The 1-D `parts` (at least one) back to back, each zero-padded to its entry of `sizes`, in one copy (none
    for one part that needs no padding)."""
    if len(parts) == 1 and parts[0].numel() == sizes[0]:
        return parts[0]
    zeros = parts[0].new_zeros(max(s - p.numel() for p, s in zip(parts, sizes, strict=True)))
    pieces = [piece for p, s in zip(parts, sizes, strict=True) for piece in (p, zeros[: s - p.numel()])]
    return torch.cat(pieces)


def _largest_of(parts: Sequence[torch.Tensor]) -> float:
    """The largest |value| of all `parts` (of one dtype; NaN when one is NaN) in one host sync. (One aminmax per
    part: 0.7 ms for paper-fmnist's 220 tensors on a CPU core, where torch._foreach_norm(inf) took 8 ms.)"""
    nonempty = [p for p in parts if p.numel()]
    if not nonempty:
        return 0.0
    lows, highs = zip(*(torch.aminmax(p) for p in nonempty), strict=True)
    return largest_magnitude(torch.stack([*lows, *highs]))


def _check_finite(parts: Sequence[torch.Tensor], wheres: Sequence[str], role: str) -> None:
    """NonFiniteTensor naming the first NaN/Inf of the first part holding one."""
    if math.isfinite(_largest_of(parts)):
        return
    for part, where in zip(parts, wheres, strict=True):
        if not math.isfinite(largest_magnitude(part)):
            i = _first(~torch.isfinite(part))
            raise NonFiniteTensor(f"{where}: {role}[{i}] is {float(part[i])}")


def _check_indices(indices: torch.Tensor, numel: int, where: str) -> None:
    """BadIndices, naming the first offender, unless `indices` are strictly increasing within [0, numel)."""
    if indices.numel() == 0:
        return
    increasing = indices[1:] > indices[:-1]
    if not bool(increasing.all()):
        i = _first(~increasing)
        raise BadIndices(f"{where}: indices[{i + 1}] = {int(indices[i + 1])} follows indices[{i}] = {int(indices[i])}; indices must be strictly increasing")
    first, last = int(indices[0]), int(indices[-1])
    if first < 0 or last >= numel:
        position, value = (0, first) if first < 0 else (indices.numel() - 1, last)
        raise BadIndices(f"{where}: indices[{position}] = {value} is outside the tensor's {numel} elements")


def _largest(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The positions of the k largest of (n,) `magnitudes` (ties broken by torch.topk), increasing, int64.

    A full top-k of a large tensor is slow (about 0.26 s for 3M elements on a CPU core), so the candidates are
    narrowed first by sampling, as Deep Gradient Compression does (Lin et al. 2018): a threshold t
    from an evenly strided sample, set to keep about 1.25 k of the n elements; when at least k are >= t, the
    k largest all are, and the exact top-k runs over those candidates alone. Otherwise it runs over all."""
    n = magnitudes.numel()
    if n >= 4 * _SAMPLE and k <= n // 2:
        sample = magnitudes[:: n // _SAMPLE]  # (about _SAMPLE,) a strided view
        above = min(sample.numel(), math.ceil(1.25 * k * sample.numel() / n) + 16)  # sampled elements to keep
        threshold = torch.kthvalue(sample, sample.numel() - above + 1).values
        candidates = (magnitudes >= threshold).nonzero().view(-1)  # (c,) increasing
        if candidates.numel() >= k:
            return candidates[torch.topk(magnitudes[candidates], k, sorted=False).indices].sort().values
    return torch.topk(magnitudes, k, sorted=False).indices.sort().values


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(2m,) int8 in -8..7 -> (m,) uint8: element 2i in the high nibble, 2i+1 in the low one."""
    u = codes.view(torch.uint8)  # two's complement; the low 4 bits are the nibble
    return (u[0::2] << 4) | (u[1::2] & 0xF)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(m,) uint8 -> (2m,) int8 in -8..7 (4-bit two's complement, sign-extended)."""
    high = packed.view(torch.int8) >> 4  # arithmetic shift: sign-extends the high nibble
    low = ((packed & 0xF) ^ 0x8).view(torch.int8) - 8  # 0..7 -> 0..7, 8..15 -> -8..-1
    return torch.stack((high, low), dim=1).view(-1)


def _first(mask: torch.Tensor) -> int:
    """The position of the first True of a 1-D mask that holds one."""
    return int(mask.nonzero()[0, 0])
