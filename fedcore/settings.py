"""The settings feddiff accepts, each as a type that carries its range or its allowed values, and typed
configs built from untyped values (YAML, flags, a task off the wire) by pydantic, or one line of errors.

The ranges of what a worker runs are defined here once: the coordinator checks its configuration against
them at start, and a worker every task it receives."""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from annotated_types import Interval
from pydantic import TypeAdapter, ValidationError

T = TypeVar("T")

# --- what a worker runs -------------------------------------------------------------------------------------
MAX_EPOCHS = 10_000
MAX_BATCH = 1 << 16
MAX_EVAL_SAMPLES = 100_000
MAX_SAMPLING_STEPS = 1000  # DDPM's T: DDIM takes at most every step

Epochs = Annotated[int, Interval(ge=1, le=MAX_EPOCHS)]  # local epochs per round
BatchSize = Annotated[int, Interval(ge=1, le=MAX_BATCH)]
LearningRate = Annotated[float, Interval(gt=0, lt=1)]  # Adam's step size; NaN and infinities fall outside
EvalSamples = Annotated[int, Interval(ge=1, le=MAX_EVAL_SAMPLES)]  # images sampled per evaluated model
SamplingSteps = Annotated[int, Interval(ge=1, le=MAX_SAMPLING_STEPS)]  # DDIM steps

# --- common shapes of settings ------------------------------------------------------------------------------
Positive = Annotated[int, Interval(ge=1)]
NonNegative = Annotated[int, Interval(ge=0)]
FiniteNonNegative = Annotated[float, Interval(ge=0, lt=math.inf)]  # NaN and infinities fall outside
Seconds = Annotated[float, Interval(gt=0)]
Fraction = Annotated[float, Interval(gt=0, le=1)]
Seed = Annotated[int, Interval(ge=0, le=(1 << 64) - 1)]  # numpy's SeedSequence and torch take 0 .. 2**64-1
Port = Annotated[int, Interval(ge=-1, le=65535)]  # -1 = off, 0 = a free port the system picks
ProgressMode = Literal["auto", "bar", "log", "off"]  # auto: a live line on a terminal, log lines otherwise


@dataclass(frozen=True)
class Described:
    """A type's meaning in words, for `expected` (a mapping, or a value that has more than one spelling)."""

    words: str


class SettingsError(ValueError):
    """Values that are not of their setting's type or lie outside its range; the message is one line that
    names each setting, its value and what was expected."""


Location = tuple[str | int, ...]


def dotted(loc: Location) -> str:
    return ".".join(str(part) for part in loc)


def flag(loc: Location) -> str:
    """A setting's command-line flag: `batch_size` and `speed.batch_size` are both --batch-size."""
    return "--" + str(loc[-1]).replace("_", "-")


def build(cls: type[T], values: Mapping[str, Any], *, name: Callable[[Location], str] = dotted) -> T:
    """`cls` (a dataclass) from `values`, each converted to its field's type ('1e-4' to a float, '3' to an
    int; 2.5 is no int); SettingsError for an unknown key, a value that does not convert or one outside its
    range, and for what the dataclass's own checks refuse. `name` turns a setting's location into the name
    the user knows it by (a flag, a key of a file)."""
    try:
        return _adapter(cls).validate_python(dict(values))
    except ValidationError as e:
        raise SettingsError("; ".join(_message(cls, err, name) for err in e.errors())) from None


@functools.cache
def _adapter(cls: type[T]) -> TypeAdapter[T]:
    return TypeAdapter(cls)


def _message(cls: type, err: Any, name: Callable[[Location], str]) -> str:
    loc: Location = tuple(err["loc"])
    if not loc:  # the dataclass's own check (__post_init__): its message names the setting
        return str(err.get("ctx", {}).get("error", err["msg"]))
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"unknown setting {name(loc)} (known: {', '.join(_known(cls, loc[:-1]))})"
    if err["type"] == "missing_argument":
        return f"{name(loc)} is required"
    return f"{name(loc)} = {err['input']!r}: expected {expected(_field_type(cls, loc))}"


def _field_type(cls: type, loc: Location) -> Any:
    """The declared type of the setting at `loc`, nested dataclasses followed."""
    tp: Any = cls
    for part in loc:
        target = _strip(tp)
        if not (is_dataclass(target) and isinstance(part, str)):
            break
        tp = get_type_hints(target, include_extras=True)[part]
    return tp


def _known(cls: type, loc: Location) -> list[str]:
    target = _strip(_field_type(cls, loc)) if loc else cls
    return [f.name for f in fields(target)] if is_dataclass(target) else []


def _strip(tp: Any) -> Any:
    return get_args(tp)[0] if get_origin(tp) is Annotated else tp


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def expected(tp: Any) -> str:
    """What a setting of type `tp` takes, in words: 'an integer in 1..10000', "one of 'huber', 'mse'"."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *metadata = get_args(tp)
        described = [m.words for m in metadata if isinstance(m, Described)]
        if described:
            return described[0]
        text = expected(base)
        for m in metadata:
            if isinstance(m, Interval):
                text += " " + _interval(m, integral=base is int)
        return text
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(expected(a) for a in get_args(tp) if a is not type(None))
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _interval(m: Interval, *, integral: bool) -> str:
    low, high = (m.ge if m.ge is not None else m.gt), (m.le if m.le is not None else m.lt)
    if low is not None and high is not None:
        if integral and m.ge is not None and m.le is not None:
            return f"in {low}..{high}"
        return f"in {'[' if m.ge is not None else '('}{low}, {high}{']' if m.le is not None else ')'}"
    if low is not None:
        return f"{'>=' if m.ge is not None else '>'} {low}"
    return f"{'<=' if m.le is not None else '<'} {high}"
