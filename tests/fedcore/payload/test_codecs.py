"""Delta codecs: names, round-trip error bounds, sizes in closed form, error feedback, and every malformed field
refused with its typed error."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from decimal import Decimal

import pytest
import torch

from fedcore.errors import BadIndices, BadScale, CodecSpecError, CodeOutOfRange, NonFiniteTensor, PayloadError, SchemaError
from fedcore.payload.codecs import BFloat16, Blockwise, Codec, Encoded, Identity, TopK, decode, read_spec
from fedcore.payload.feedback import ErrorFeedback

CODECS = ["none", "bf16", "int8", "int8:7", "int4", "int4:5", "topk:0.1", "topk:0.1+int8", "topk:0.25+int4:3", "topk:0.5+bf16", "topk:1"]
SHAPES = [(), (0,), (1,), (2,), (63,), (64,), (65,), (129,), (3, 0), (8, 4, 3, 3), (7, 5, 3, 3)]  # conv weights last


def _delta(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Values like a delta (about 1e-4), over several orders of magnitude, with an all-zero run of 70 elements."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 1e-4 * torch.exp(torch.randn(shape, generator=g))
    flat = x.view(-1)
    flat[10:80] = 0.0
    return x


def _block_step(x: torch.Tensor, block: int, qmax: int) -> torch.Tensor:
    """Per element, absmax / Q of its block, computed apart from the codec (padding the last block)."""
    flat = x.reshape(-1)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % block))
    absmax = padded.view(-1, block).abs().amax(dim=1)
    return (absmax / qmax).repeat_interleave(block)[: flat.numel()]


# --- names -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*CODECS, "int8:1", "int4:1048576", "topk:0.000000001", "topk:0.05+int8:128"])
def test_a_canonical_name_reads_back_as_the_same_codec(name: str) -> None:
    codec = Codec.parse(name)

    assert str(codec) == name and Codec.parse(str(codec)) == codec and hash(Codec.parse(name)) == hash(codec)


@pytest.mark.parametrize(
    ("name", "canonical"),
    [("int8:64", "int8"), ("int4:64", "int4"), ("topk:0.050", "topk:0.05"), ("topk:1.0", "topk:1"), ("topk:.5", None), ("topk:00.5", "topk:0.5")],
)
def test_equivalent_names_give_one_codec(name: str, canonical: str | None) -> None:
    if canonical is None:
        with pytest.raises(ValueError, match=r"topk:\.5"):
            Codec.parse(name)
    else:
        assert str(Codec.parse(name)) == canonical


def test_parsed_codecs_are_typed_values() -> None:
    assert Codec.parse("int4:32") == Blockwise(bits=4, block=32)
    assert Codec.parse("topk:0.05+int8") == TopK(Decimal("0.05"), Blockwise(8))
    assert Codec.parse("topk:0.05") == TopK(Decimal("0.05"), Identity())
    assert Codec.parse("bf16") == BFloat16() != Identity()


@pytest.mark.parametrize(
    "name",
    [
        "", "int16", "INT8", " int8", "int8 ", "int8:", "int8:0", "int8:-1", "int8:08", "int8:1048577", "int8:64:1", "int8:x", "none:4",
        "bf16:64", "topk", "topk:", "topk:0", "topk:0.0", "topk:1.5", "topk:-0.1", "topk:nan", "topk:inf", "topk:1e-3", "topk:0.05+",
        "topk:0.05+none", "topk:0.05+topk:0.1", "topk:0.05+int8+int8", "int8+int8", "none+int8", "x" * 100,
    ],
)  # fmt: skip
def test_anything_else_is_refused_naming_the_string(name: str) -> None:
    with pytest.raises(ValueError, match="unknown codec") as refused:
        Codec.parse(name)

    assert repr(name[:64]).strip("'") in str(refused.value)


def test_codecs_built_directly_are_checked_too() -> None:
    with pytest.raises(ValueError, match="block size 0"):
        Blockwise(8, 0)
    with pytest.raises(ValueError, match="8 or 4 bits"):
        Blockwise(16, 64)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fraction"):
        TopK(Decimal("1.01"))
    with pytest.raises(ValueError, match="fraction"):
        TopK(Decimal("NaN"))


# --- round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_a_round_trip_keeps_dtype_and_shape_and_the_closed_form_size(name: str, shape: tuple[int, ...]) -> None:
    codec, x = Codec.parse(name), _delta(shape)

    encoded = codec.encode(x)
    y = encoded.decode()

    assert y.dtype == torch.float32 and y.shape == x.shape
    layout = codec.layout(x.numel())
    assert {r: (tuple(t.shape), t.dtype) for r, t in encoded.tensors.items()} == {r: (s.shape, s.dtype) for r, s in layout.items()}
    assert list(encoded.tensors) == list(layout)
    assert encoded.nbytes == codec.encoded_bytes(x.numel()) == sum(s.numel * s.dtype.itemsize for s in layout.values())


def test_none_is_exact_and_shares_memory_both_ways() -> None:
    x = _delta((8, 4, 3, 3))

    encoded = Codec.parse("none").encode(x)
    y = encoded.decode()

    assert torch.equal(y, x) and encoded.tensors["values"].data_ptr() == x.data_ptr() == y.data_ptr()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bf16_is_within_2_to_the_minus_8_relative(shape: tuple[int, ...]) -> None:
    x = _delta(shape)

    y = Codec.parse("bf16").encode(x).decode()

    assert bool(((x - y).abs() <= 2**-8 * x.abs()).all())


@pytest.mark.parametrize(("name", "block", "qmax"), [("int8", 64, 127), ("int8:7", 7, 127), ("int4", 64, 7), ("int4:5", 5, 7), ("int8:1", 1, 127)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_blockwise_error_is_at_most_half_a_step_of_its_block(name: str, block: int, qmax: int, shape: tuple[int, ...]) -> None:
    x = _delta(shape)

    y = Codec.parse(name).encode(x).decode()

    step = _block_step(x, block, qmax).view(x.shape)
    assert bool(((x - y).abs() <= step * (0.5 + 1e-5)).all())
    assert bool((y[x == 0] == 0).all())  # an all-zero block decodes to zeros


def test_blockwise_codes_and_scales_are_what_the_scheme_says() -> None:
    x = torch.tensor([0.5, -1.0, 0.25, 0.0, 3.0, -1.5, 0.0])  # blocks of 4: [0.5, -1, 0.25, 0], [3, -1.5, 0]

    int8 = Codec.parse("int8:4").encode(x).tensors
    int4 = Codec.parse("int4:4").encode(x).tensors

    assert int8["absmax"].tolist() == int4["absmax"].tolist() == [1.0, 3.0]
    assert int8["codes"].tolist() == [64, -127, 32, 0, 127, -64, 0]  # 0.5 * 127 = 63.5 rounds to even, 64
    # int4: [4, -7, 2, 0, 7, -4, 0] as nibbles, the first of each pair high, the last padded with 0
    assert int4["codes"].tolist() == [0x49, 0x20, 0x7C, 0x00]


@pytest.mark.parametrize("name", ["topk:0.1", "topk:0.1+int8", "topk:0.25+int4:3", "topk:0.5+bf16"])
@pytest.mark.parametrize("shape", [(1,), (65,), (1000,), (7, 5, 3, 3)], ids=str)
def test_topk_keeps_exactly_k_largest_the_rest_zero(name: str, shape: tuple[int, ...]) -> None:
    codec = Codec.parse(name)
    assert isinstance(codec, TopK)
    x = _delta(shape)
    n, k = x.numel(), codec.kept(x.numel())

    encoded = codec.encode(x)
    y = encoded.decode().reshape(-1)

    kept = torch.zeros(n, dtype=torch.bool)
    kept[encoded.tensors["indices"].long()] = True
    assert int(kept.sum()) == k == math.ceil(float(codec.fraction) * n - 1e-9)
    assert bool((y[~kept] == 0).all())
    flat = x.reshape(-1)
    dropped = flat[~kept].abs()
    assert dropped.numel() == 0 or float(flat[kept].abs().min()) >= float(dropped.max())
    values = codec.values
    if isinstance(values, Identity):
        assert torch.equal(y[kept], flat[kept])
    elif isinstance(values, BFloat16):
        assert bool(((y[kept] - flat[kept]).abs() <= 2**-8 * flat[kept].abs()).all())
    else:
        step = _block_step(flat[kept], values.block, values.qmax)
        assert bool(((y[kept] - flat[kept]).abs() <= step * (0.5 + 1e-5)).all())


@pytest.mark.parametrize("fraction", ["0.001", "0.01", "0.1", "0.5"])
def test_topk_of_a_large_tensor_keeps_what_a_full_topk_keeps(fraction: str) -> None:
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(1))  # large enough to narrow by sampling
    codec = TopK(Decimal(fraction))

    indices = codec.encode(x).tensors["indices"].long()

    assert torch.equal(indices, torch.topk(x.abs(), codec.kept(x.numel())).indices.sort().values)


def test_topk_keeps_the_largest_when_the_sample_misses_them() -> None:
    n = 300_000
    x = torch.ones(n)
    x[:: n // 2**14] = 2.0  # the strided sample sees only these, fewer than k: the full top-k runs
    codec = TopK(Decimal("0.1"))

    kept = x[codec.encode(x).tensors["indices"].long()]

    assert kept.numel() == 30_000 and float(kept.sum()) == float(torch.topk(x, 30_000).values.sum())


@pytest.mark.parametrize(
    ("name", "n", "k"),
    [("topk:0.05", 100, 5), ("topk:0.07", 100, 7), ("topk:0.3", 10, 3), ("topk:0.001", 10, 1), ("topk:0.1", 0, 0), ("topk:1", 5, 5), ("topk:0.5", 3, 2)],
)
def test_topk_keeps_ceil_of_f_n_computed_exactly(name: str, n: int, k: int) -> None:
    codec = Codec.parse(name)  # 0.05 * 100 and 0.07 * 100 are above 5 and 7 in float arithmetic
    assert isinstance(codec, TopK)

    assert codec.kept(n) == k
    assert codec.encode(torch.randn(n)).tensors["indices"].numel() == k


def test_topk_indices_are_int64_only_beyond_2_to_the_31_elements() -> None:
    codec = TopK(Decimal("0.5"), Blockwise(8))

    assert codec.layout(2**31)["indices"].dtype == torch.int32
    assert codec.layout(2**31 + 1)["indices"].dtype == torch.int64
    k = 2**30 + 1
    assert codec.encoded_bytes(2**31 + 1) == 8 * k + k + 4 * math.ceil(k / 64)


@pytest.mark.parametrize(
    ("name", "n", "size"),
    [("none", 1000, 4000), ("bf16", 1001, 2002), ("int8", 1000, 1000 + 4 * 16), ("int4", 1001, 501 + 4 * 16), ("int8:128", 1, 1 + 4), ("int4", 0, 0),
     ("topk:0.05", 1000, 50 * 4 + 50 * 4), ("topk:0.05+int8", 1000, 50 * 4 + 50 + 4), ("topk:0.05+int4:8", 1000, 50 * 4 + 25 + 4 * 7)],
)  # fmt: skip
def test_encoded_bytes_in_closed_form(name: str, n: int, size: int) -> None:
    assert Codec.parse(name).encoded_bytes(n) == size == Codec.parse(name).encode(torch.randn(n)).nbytes


def test_a_channels_last_tensor_codes_in_its_logical_order() -> None:
    x = _delta((4, 8, 3, 3))
    channels_last = x.contiguous(memory_format=torch.channels_last)

    for name in ("none", "int8", "int4:5", "topk:0.1+int8"):
        codec = Codec.parse(name)
        assert all(torch.equal(a, b) for a, b in zip(codec.encode(channels_last).tensors.values(), codec.encode(x).tensors.values(), strict=True))
    assert torch.equal(Codec.parse("none").encode(channels_last).decode(), x)


def test_the_spec_is_json_and_reads_back() -> None:
    x = _delta((8, 4, 3, 3))
    encoded = Codec.parse("topk:0.1+int8").encode(x)

    spec = json.loads(json.dumps(encoded.spec()))

    assert spec == {"codec": "topk:0.1+int8", "shape": [8, 4, 3, 3]}
    assert torch.equal(decode(spec, encoded.tensors, shape=(8, 4, 3, 3), expected=Codec.parse("topk:0.1+int8")), encoded.decode())


@pytest.mark.parametrize("name", ["none", "bf16", "int8", "topk:0.1+int8"])
def test_encode_refuses_other_dtypes_and_non_finite_values(name: str) -> None:
    codec = Codec.parse(name)
    with pytest.raises(ValueError, match=r"'w' is torch\.float64"):
        codec.encode(torch.zeros(3, dtype=torch.float64), name="w")
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="'w' holds 1 NaN/Inf"):
            codec.encode(torch.tensor([0.0, bad, 1.0]), name="w")


def test_bf16_refuses_finite_values_beyond_its_range() -> None:
    with pytest.raises(ValueError, match="beyond bfloat16's range"):
        Codec.parse("bf16").encode(torch.tensor([1.0, 3.4e38]))


# --- batches ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*CODECS, "int4:1", "topk:0.3+int4:5"])
def test_a_batch_codes_each_tensor_as_it_is_coded_alone(name: str) -> None:
    codec = Codec.parse(name)
    tensors = {f"t{i}": _delta(shape, seed=i) for i, shape in enumerate(SHAPES)}

    batch = codec.encode_all(tensors)
    decoded = codec.decode_all({n: e.tensors for n, e in batch.items()}, {n: t.shape for n, t in tensors.items()})

    assert list(batch) == list(decoded) == list(tensors)
    for n, t in tensors.items():
        alone = codec.encode(t, name=n)
        assert batch[n].shape == alone.shape and list(batch[n].tensors) == list(alone.tensors)
        assert all(torch.equal(batch[n].tensors[r], alone.tensors[r]) for r in alone.tensors)
        assert torch.equal(decoded[n], alone.decode()) and decoded[n].shape == t.shape


def test_an_empty_batch_codes_to_nothing() -> None:
    for name in CODECS:
        assert Codec.parse(name).encode_all({}) == {} and Codec.parse(name).decode_all({}, {}) == {}


def test_a_batch_refuses_unknown_and_missing_tensors() -> None:
    codec = Codec.parse("int8")
    coded = {n: e.tensors for n, e in codec.encode_all({"a": torch.ones(3), "b": torch.ones(4)}).items()}

    with pytest.raises(SchemaError, match="unknown tensor 'b'"):
        codec.decode_all(coded, {"a": (3,)})
    with pytest.raises(SchemaError, match="missing tensor 'c'"):
        codec.decode_all(coded, {"a": (3,), "b": (4,), "c": (1,)})


def test_a_batch_names_the_tensor_that_cannot_be_coded() -> None:
    with pytest.raises(ValueError, match="'b' holds 1 NaN/Inf"):
        Codec.parse("int8").encode_all({"a": torch.ones(3), "b": torch.tensor([1.0, math.nan]), "c": torch.ones(2)})
    with pytest.raises(ValueError, match=r"'c' holds a value of magnitude 3\.4e\+38"):
        Codec.parse("bf16").encode_all({"a": torch.ones(3), "c": torch.tensor([3.4e38])})


# --- error feedback ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["int4", "topk:0.1", "topk:0.1+int8", "bf16"])
def test_error_feedback_loses_nothing_over_rounds(name: str) -> None:
    shapes = {"conv.weight": (7, 5, 3, 3), "conv.bias": (7,), "scale": ()}
    feedback = ErrorFeedback(Codec.parse(name))
    true_sum = {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}
    sent_sum = {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}

    for round_index in range(6):
        deltas = {n: _delta(s, seed=round_index * 10 + i) for i, (n, s) in enumerate(shapes.items())}
        for n, coded in feedback.compress_all(deltas).items():
            true_sum[n] += deltas[n].double()
            sent_sum[n] += coded.decode().double()

    state = feedback.state_dict()
    for n, shape in shapes.items():
        assert state[n].dtype == torch.float32 and state[n].shape == shape
        scale = float(true_sum[n].abs().max())
        assert torch.allclose(sent_sum[n] + state[n].double(), true_sum[n], rtol=0, atol=1e-6 * scale)


def test_error_feedback_sends_what_it_dropped_the_round_before() -> None:
    feedback = ErrorFeedback(Codec.parse("topk:0.5"))

    first = feedback.compress_all({"w": torch.tensor([1.0, -4.0, 2.0, 0.5])})["w"].decode()
    second = feedback.compress_all({"w": torch.zeros(4)})["w"].decode()

    assert first.tolist() == [0.0, -4.0, 2.0, 0.0]
    assert second.tolist() == [1.0, 0.0, 0.0, 0.5]  # the residual, sent once it is the largest
    assert feedback.state_dict()["w"].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_error_feedback_state_resumes_where_it_stopped() -> None:
    codec = Codec.parse("topk:0.1+int8")
    deltas = [_delta((7, 5, 3, 3), seed=s) for s in range(3)]
    whole = ErrorFeedback(codec)
    for d in deltas:
        expected = whole.compress_all({"w": d})["w"]

    first = ErrorFeedback(codec)
    for d in deltas[:2]:
        first.compress_all({"w": d})
    resumed = ErrorFeedback(codec, {n: t.clone() for n, t in first.state_dict().items()})
    got = resumed.compress_all({"w": deltas[2]})["w"]

    assert all(torch.equal(got.tensors[r], expected.tensors[r]) for r in expected.tensors)
    assert torch.equal(resumed.state_dict()["w"], whole.state_dict()["w"])


def test_lossless_codecs_leave_no_residual() -> None:
    feedback = ErrorFeedback(Codec.parse("none"))
    feedback.compress_all({"w": _delta((65,))})

    assert not bool(feedback.state_dict()["w"].any())


def test_error_feedback_refuses_a_residual_of_another_shape_or_a_bad_state() -> None:
    feedback = ErrorFeedback(Codec.parse("int8"), {"w": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"residual 'w' has shape \(4,\), the delta \(5,\)"):
        feedback.compress_all({"w": torch.zeros(5)})
    with pytest.raises(ValueError, match="residual 'w' is not finite float32"):
        ErrorFeedback(Codec.parse("int8"), {"w": torch.tensor([math.nan])})
    with pytest.raises(ValueError, match="residual 'w' is not finite float32"):
        ErrorFeedback(Codec.parse("int8"), {"w": torch.zeros(2, dtype=torch.float16)})


# --- malformed fields --------------------------------------------------------------------------------------

X = torch.tensor([0.5, -1.0, 0.25, 0.0, 3.0, -1.5, 0.0, 0.0, 0.0, 2.0, 0.125])  # n = 11; int8:4 blocks [.5 -1 .25 0] [3 -1.5 0 0] [0 2 .125]
Mutation = Callable[[dict[str, torch.Tensor]], None]


def _set(role: str, index: int, value: float) -> Mutation:
    def mutate(t: dict[str, torch.Tensor]) -> None:
        t[role] = t[role].clone()
        t[role][index] = value

    return mutate


def _replace(role: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Mutation:
    def mutate(t: dict[str, torch.Tensor]) -> None:
        t[role] = make(t[role])

    return mutate


def _drop(role: str) -> Mutation:
    def mutate(t: dict[str, torch.Tensor]) -> None:
        del t[role]

    return mutate


def _add(role: str) -> Mutation:
    def mutate(t: dict[str, torch.Tensor]) -> None:
        t[role] = torch.zeros(1)

    return mutate


MALFORMED: list[tuple[str, str, Mutation, type[PayloadError], str]] = [
    # codec, what, mutation, error, message
    ("int8:4", "missing codes", _drop("codes"), SchemaError, "coded missing tensor 'codes'"),
    ("int8:4", "unknown role", _add("extra"), SchemaError, "coded unknown tensor 'extra'"),
    ("int8:4", "codes as uint8", _replace("codes", lambda c: c.view(torch.uint8)), SchemaError, "'codes' has dtype torch.uint8, expected torch.int8"),
    ("int8:4", "absmax as float64", _replace("absmax", lambda a: a.double()), SchemaError, "'absmax' has dtype torch.float64"),
    ("int8:4", "codes one short", _replace("codes", lambda c: c[:-1]), SchemaError, r"11 elements\): coded tensor 'codes' has shape \(10,\), expected \(11,\)"),
    ("int8:4", "a scale too many", _replace("absmax", lambda a: torch.cat([a, a[:1]])), SchemaError, r"'absmax' has shape \(4,\), expected \(3,\)"),
    ("int8:4", "2-D codes", _replace("codes", lambda c: torch.cat([c, c[:1]]).view(3, 4)), SchemaError, "'codes' has shape"),
    ("int4:4", "packed codes one long", _replace("codes", lambda c: torch.cat([c, c[:1]])), SchemaError, r"'codes' has shape \(7,\), expected \(6,\)"),
    ("int8:4", "NaN scale", _set("absmax", 1, math.nan), NonFiniteTensor, r"absmax\[1\] is nan"),
    ("int8:4", "infinite scale", _set("absmax", 2, math.inf), NonFiniteTensor, r"absmax\[2\] is inf"),
    ("int8:4", "scale -inf", _set("absmax", 1, -math.inf), NonFiniteTensor, r"absmax\[1\] is -inf"),
    ("int4:4", "NaN scale", _set("absmax", 0, math.nan), NonFiniteTensor, r"absmax\[0\] is nan"),
    ("int8:4", "negative scale", _set("absmax", 1, -3.0), BadScale, r"absmax\[1\] is -3"),
    ("int8:4", "zero scale, nonzero codes", _set("absmax", 0, 0.0), BadScale, "block 0 has absmax 0 and a largest |code| of 127"),
    ("int8:4", "scale of a block short of Q", _set("codes", 4, 100), BadScale, "block 1 has absmax 3 and a largest |code| of 100"),
    ("int8:4", "code -128", _set("codes", 9, -128), CodeOutOfRange, "code -128 at element 9 is outside -127..127"),
    ("int4:4", "nibble -8, high", _set("codes", 0, 0x89), CodeOutOfRange, "code -8 at element 0 is outside -7..7"),
    ("int4:4", "nibble -8, low", _set("codes", 0, 0x48), CodeOutOfRange, "code -8 at element 1"),
    ("int4:4", "padding nibble", _set("codes", 5, 0x21), CodeOutOfRange, "padding nibble after element 10 is 1"),
    ("none", "NaN value", _set("values", 3, math.nan), NonFiniteTensor, r"values\[3\] is nan"),
    ("bf16", "infinite value", _set("values", 4, -math.inf), NonFiniteTensor, r"values\[4\] is -inf"),
    ("bf16", "values as float16", _replace("values", lambda v: v.half()), SchemaError, "'values' has dtype torch.float16"),
    ("topk:0.5", "NaN kept value", _set("values", 0, math.nan), NonFiniteTensor, r"kept values: values\[0\] is nan"),
    ("topk:0.5", "index = n", _set("indices", 5, 11), BadIndices, r"indices\[5\] = 11 is outside the tensor's 11 elements"),
    ("topk:0.5", "index -1", _set("indices", 0, -1), BadIndices, r"indices\[0\] = -1 is outside"),
    ("topk:0.5", "repeated index", _replace("indices", lambda i: torch.cat([i[:1], i[:-1]])), BadIndices, r"indices\[1\] = \d+ follows indices\[0\] = \d+"),
    ("topk:0.5", "unsorted indices", _replace("indices", lambda i: i.flip(0)), BadIndices, "strictly increasing"),
    ("topk:0.5", "int64 indices", _replace("indices", lambda i: i.long()), SchemaError, "'indices' has dtype torch.int64, expected torch.int32"),
    ("topk:0.5", "one index short", _replace("indices", lambda i: i[:-1]), SchemaError, r"'indices' has shape \(5,\), expected \(6,\)"),
    ("topk:0.5", "one value too many", _replace("values", lambda v: torch.cat([v, v[:1]])), SchemaError, r"'values' has shape \(7,\), expected \(6,\)"),
    ("topk:0.5+int8:4", "negative scale of the kept values", _set("absmax", 0, -1.0), BadScale, r"kept values: absmax\[0\] is -1"),
    ("topk:0.5+int8:4", "kept code -128", _set("codes", 1, -128), CodeOutOfRange, "kept values: code -128 at element 1"),
    ("topk:0.5+int8:4", "repeated index before good values", _set("indices", 1, 0), BadIndices, "strictly increasing"),
    ("topk:0.5+int8:4", "scales as int8 codes' dtype", _replace("absmax", lambda a: a.to(torch.int8)), SchemaError, "'absmax' has dtype torch.int8"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "what", "mutate", "error", "message"), MALFORMED, ids=[f"{c[0]}: {c[1]}" for c in MALFORMED])
def test_a_malformed_field_is_refused_with_its_typed_error(name: str, what: str, mutate: Mutation, error: type[PayloadError], message: str) -> None:
    codec = Codec.parse(name)
    tensors = dict(codec.encode(X).tensors)
    mutate(tensors)

    with pytest.raises(error, match=message) as refused:
        codec.decode(tensors, X.shape, name="ups.0.weight")

    assert isinstance(refused.value, PayloadError) and str(refused.value).startswith(f"'ups.0.weight' ({codec}")


@pytest.mark.parametrize(("name", "what", "mutate", "error", "message"), MALFORMED, ids=[f"{c[0]}: {c[1]}" for c in MALFORMED])
def test_a_malformed_field_in_a_batch_is_refused_naming_its_tensor(name: str, what: str, mutate: Mutation, error: type[PayloadError], message: str) -> None:
    codec = Codec.parse(name)
    good = {"downs.0.weight": _delta((7, 5, 3, 3)), "downs.0.bias": _delta((13,), seed=1)}
    coded = {
        n: dict(e.tensors)
        for n, e in codec.encode_all({"downs.0.weight": good["downs.0.weight"], "ups.0.weight": X, "downs.0.bias": good["downs.0.bias"]}).items()
    }
    mutate(coded["ups.0.weight"])

    with pytest.raises(error, match=message) as refused:
        codec.decode_all(coded, {"downs.0.weight": (7, 5, 3, 3), "ups.0.weight": X.shape, "downs.0.bias": (13,)})

    assert str(refused.value).startswith(f"'ups.0.weight' ({codec}")


def test_the_good_fields_of_the_malformed_cases_decode() -> None:
    for name in {case[0] for case in MALFORMED}:
        codec = Codec.parse(name)
        assert codec.decode(dict(codec.encode(X).tensors), X.shape).shape == X.shape


def test_an_all_zero_block_has_a_zero_scale_and_nothing_else_does() -> None:
    codec = Codec.parse("int8:4")
    tensors = dict(codec.encode(X).tensors)
    assert tensors["absmax"].tolist() == [1.0, 3.0, 2.0]
    zero_block = dict(codec.encode(torch.zeros(11)).tensors)
    assert zero_block["absmax"].tolist() == [0.0, 0.0, 0.0] and not bool(zero_block["codes"].any())

    tensors["absmax"] = tensors["absmax"].clone()
    tensors["absmax"][2] = 0.0  # block 2 holds codes up to 127
    with pytest.raises(BadScale, match="block 2 has absmax 0 and a largest"):
        codec.decode(tensors, X.shape)
    assert bool((codec.decode(zero_block, X.shape) == 0).all())


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ([1], CodecSpecError, "malformed codec spec"),
        ({"codec": "int8"}, CodecSpecError, "malformed codec spec"),
        ({"codec": "int8", "shape": [11], "extra": 1}, CodecSpecError, "malformed codec spec"),
        ({"codec": 8, "shape": [11]}, CodecSpecError, "unknown codec '8'"),
        ({"codec": "int16", "shape": [11]}, CodecSpecError, "unknown codec 'int16'"),
        ({"codec": "int4", "shape": [11]}, CodecSpecError, "coded as int4, expected int8"),
        ({"codec": "int8", "shape": 11}, CodecSpecError, "malformed shape 11"),
        ({"codec": "int8", "shape": [True]}, CodecSpecError, r"malformed shape \[True\]"),
        ({"codec": "int8", "shape": [-11]}, CodecSpecError, "malformed shape"),
        ({"codec": "int8", "shape": [11.0]}, CodecSpecError, "malformed shape"),
        ({"codec": "int8", "shape": [12]}, SchemaError, r"has shape \(12,\), expected \(11,\)"),
        ({"codec": "int8", "shape": [1, 11]}, SchemaError, r"has shape \(1, 11\), expected \(11,\)"),
    ],
)
def test_a_malformed_spec_is_refused(spec: object, error: type[PayloadError], message: str) -> None:
    with pytest.raises(error, match=message):
        read_spec(spec, shape=(11,), expected=Codec.parse("int8"), name="w")


def test_the_codec_errors_are_payload_errors_with_their_own_reasons() -> None:
    reasons = {cls: cls.reason for cls in (CodecSpecError, BadScale, CodeOutOfRange, BadIndices)}

    assert all(issubclass(cls, PayloadError) for cls in reasons)
    assert len(set(reasons.values()) | {PayloadError.reason, SchemaError.reason, NonFiniteTensor.reason}) == 7


def test_encoded_is_a_plain_record() -> None:
    encoded = Codec.parse("int8").encode(torch.ones(3))

    assert isinstance(encoded, Encoded) and encoded.shape == (3,) and encoded.codec == Blockwise(8)


# --- CUDA --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", CODECS)
def test_cuda_codes_and_decodes_on_the_device_as_the_cpu_does(name: str) -> None:
    codec, x = Codec.parse(name), _delta((7, 5, 3, 3))

    on_gpu = codec.encode(x.cuda())
    on_cpu = codec.encode(x)

    assert all(t.is_cuda for t in on_gpu.tensors.values())
    decoded = on_gpu.decode()
    assert decoded.is_cuda and torch.equal(decoded.cpu(), on_cpu.decode())
    assert all(torch.equal(on_gpu.tensors[r].cpu(), on_cpu.tensors[r]) for r in on_cpu.tensors)  # no ties in random values
