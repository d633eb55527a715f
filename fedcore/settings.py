"""The settings feddiff accepts, each as a type that carries its range or its allowed values, and typed
configs built from untyped values (YAML, flags, a task off the wire) by pydantic, or one line of errors.

The ranges of what a worker runs are defined here once: the coordinator checks its configuration against
them at start, and a worker every task it receives."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import os
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from annotated_types import Interval
from pydantic import AfterValidator, BeforeValidator, ConfigDict, StringConstraints, TypeAdapter, ValidationError

from fedcore.errors import SettingsError

T = TypeVar("T")

# What every typed config built here takes (each declares `__pydantic_config__ = settings.CONFIG`, and `build`
# refuses one that does not): no unknown key, and no NaN or infinity in any number ('.inf' in YAML, 'inf' or
# '1e400' as a flag), whatever its range. Booleans are strict on top (`build`): True is no number, 1 no boolean.
CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass(frozen=True)
class Described:
    """A type's meaning in words, for `expected` (a mapping, or a value that has more than one spelling)."""

    words: str


# --- what a worker runs -------------------------------------------------------------------------------------
MAX_EPOCHS = 10_000
MAX_BATCH = 1 << 16
MAX_EVAL_SAMPLES = 100_000
MAX_SAMPLING_STEPS = 1000  # DDPM's T: DDIM takes at most every step
MAX_ROUNDS = (1 << 32) - 1  # a run's rounds: the wire counts them in a uint32 (JoinResponse.rounds)

Epochs = Annotated[int, Interval(ge=1, le=MAX_EPOCHS)]  # local epochs per round
BatchSize = Annotated[int, Interval(ge=1, le=MAX_BATCH)]
LearningRate = Annotated[float, Interval(gt=0, lt=1)]  # Adam's step size; NaN and infinities fall outside
EvalSamples = Annotated[int, Interval(ge=1, le=MAX_EVAL_SAMPLES)]  # images sampled per evaluated model
FdSamples = Annotated[int, Interval(ge=2, le=MAX_EVAL_SAMPLES)]  # images sampled for an FD: a covariance needs two
SamplingSteps = Annotated[int, Interval(ge=1, le=MAX_SAMPLING_STEPS)]  # DDIM steps
Rounds = Annotated[int, Interval(ge=1, le=MAX_ROUNDS)]  # R, the same for a simulated run as for one over gRPC

# --- common shapes of settings ------------------------------------------------------------------------------
Positive = Annotated[int, Interval(ge=1)]
NonNegative = Annotated[int, Interval(ge=0)]
FiniteNonNegative = Annotated[float, Interval(ge=0)]
# The longest wait Python can time (threading, asyncio): every duration setting lies within it.
MAX_WAIT_SECONDS = threading.TIMEOUT_MAX
# A duration setting, in seconds: at most a week, longer than any wait of a run needs (a round's deadline, a
# save's retries), said in a user's units, and far within what Python's waits take and what the wire's
# millisecond fields hold (a week is 6.048e8 ms, a uint32 field 4.29e9).
MAX_SECONDS = 7 * 24 * 3600
Seconds = Annotated[float, Interval(gt=0, le=MAX_SECONDS), Described(f"more than 0 s, up to {MAX_SECONDS} s (a week)")]
# A duration where 0 means "at once" (a departed worker forgotten as soon as it departs), within the same week.
SecondsOrZero = Annotated[float, Interval(ge=0, le=MAX_SECONDS), Described(f"0 s up to {MAX_SECONDS} s (a week)")]
Fraction = Annotated[float, Interval(gt=0, le=1)]
Concentration = Annotated[float, Interval(gt=0)]  # Dirichlet's beta: how skewed the skewed splits are
Seed = Annotated[int, Interval(ge=0, le=(1 << 64) - 1)]  # numpy's SeedSequence and torch take 0 .. 2**64-1
Port = Annotated[int, Interval(ge=-1, le=65535)]  # -1 = off, 0 = a free port the system picks
# torch's CPU threads: more than the machine's CPUs never runs faster, and torch tries to start every one of them
MAX_THREADS = os.cpu_count() or 1
Threads = Annotated[int, Interval(ge=0, le=MAX_THREADS), Described(f"an integer in 0..{MAX_THREADS} (this machine's CPUs)")]
ProgressMode = Literal["auto", "bar", "log", "off"]  # auto: a live line on a terminal, log lines otherwise


def _comma_list(value: object) -> object:
    """A comma list given as one string ('iid,label', a flag's; a closing comma taken) as the tuple of its
    items; ValueError for an empty item ('iid,,label', ',iid'); any other value as it is (a list from a YAML
    file, a tuple default)."""
    if isinstance(value, str):
        items = tuple(item.strip() for item in value.split(","))
        items = items[:-1] if len(items) > 1 and not items[-1] else items  # 'iid,label,': a list's closing comma
        if "" in items:  # 'udec,,full': a typo, not a list of two
            raise ValueError("an empty item before a comma")
        return items
    return value


# A tuple setting given as a comma list (`Annotated[tuple[SplitKind, ...], CommaList]`): each item is then
# checked as the tuple's item type says, a wrong one named by the setting's flag ("--splits = 'dirichlet': ...").
CommaList = BeforeValidator(_comma_list)


# --- paths: checked at start, so that a typo stops the process before it reads or writes anything -----------
def _path(text: str, *, kind: Literal["file", "folder", "either"]) -> str:
    """`text` when it is empty (not used) or names a readable file or folder of `kind`; ValueError saying what
    is wrong with it otherwise."""
    if not text:
        return text
    path = Path(text)
    if not path.exists():
        raise ValueError("no such file or folder")
    if kind == "file" and not path.is_file():
        raise ValueError("not a file")
    if kind == "folder" and not path.is_dir():
        raise ValueError("not a folder")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise ValueError("not readable by this process")
    return text


# A folder the process writes (created if missing); "" is no folder (it would write into the working directory)
Folder = Annotated[str, StringConstraints(min_length=1), Described("a folder path")]

# A path the process reads (empty = not used): a typo is refused at start, not when the file is first needed.
ExistingFile = Annotated[str, AfterValidator(functools.partial(_path, kind="file")), Described("a readable file")]
ExistingFolder = Annotated[str, AfterValidator(functools.partial(_path, kind="folder")), Described("a readable folder")]
ExistingPath = Annotated[str, AfterValidator(functools.partial(_path, kind="either")), Described("a readable file or folder")]


Location = tuple[str | int, ...]


def dotted(loc: Location) -> str:
    return ".".join(str(part) for part in loc)


# The names of the settings given to a config `build` built (a flag, a key of a settings file), kept on the
# config itself: `given` reads them, and `replace` carries them over.
_GIVEN = "_settings_given"
# The config `build` is validating now and the names given to it, for the messages of its own checks
# (`__post_init__` runs before `build` can keep the names on the config).
_building: contextvars.ContextVar[tuple[type, frozenset[str]] | None] = contextvars.ContextVar("settings_building", default=None)


def given(config: object) -> frozenset[str] | None:
    """The names of the settings given to `config` when `build` built it (the others hold their defaults), a
    setting of a config it holds by its dotted name as well (`data.num_clients`, next to `data`); None for a
    config built otherwise (in code, by `dataclasses.replace`)."""
    names: frozenset[str] | None = vars(config).get(_GIVEN)
    building = _building.get()
    if names is None and building is not None and type(config) is building[0]:
        return building[1]
    return names


def replace(config: T, **changes: Any) -> T:
    """`dataclasses.replace`, the new config keeping the record of which settings were given (`given`)."""
    new = dataclasses.replace(config, **changes)  # type: ignore[type-var]
    names = given(config)
    if names is not None:
        object.__setattr__(new, _GIVEN, names)
    return new


def is_default(config: object, name: str) -> bool:
    """Whether the setting `name` of a config (a dataclass; `data.num_clients` for one of a config it holds)
    was left at its default: not given, when `build` built it (a value given that equals the default was given
    all the same); else whether it holds its declared default."""
    names = given(config)
    if names is not None:
        return name not in names
    return bool(value_of(config, name) == default_of(type(config), name))


def value_of(config: object, name: str) -> Any:
    """The setting `name` of `config`, `data.num_clients` that of the config it holds as `data`."""
    for part in name.split("."):
        config = getattr(config, part)
    return config


def default_of(cls: type, name: str) -> Any:
    """The declared default of setting `name` of `cls`; that of a held config's setting (`data.num_clients`)
    as the held config's own default holds it (a command's config may hold one with other defaults)."""
    first, _, rest = name.partition(".")
    (f,) = [f for f in fields(cls) if f.name == first]
    default = f.default_factory() if callable(f.default_factory) else f.default
    return value_of(default, rest) if rest else default


def build(cls: type[T], values: Mapping[str, Any], *, name: Callable[[Location], str] = dotted) -> T:
    """`cls` (a dataclass) from `values`, each converted to its field's type ('1e-4' to a float, '3' to an
    int; 2.5 is no int, True no number, 1 no boolean, 'inf' and 'nan' no number at all); SettingsError for an
    unknown key, a value that does not convert or one outside its range, and for what the dataclass's own
    checks refuse. `name` turns a setting's location into the name the user knows it by (a flag, a key of a
    file). The config keeps the names of `values` as the settings given (`given`); the others hold defaults,
    those of a config it holds the defaults of the config its field holds by default (`SplitConfig(num_clients=1)`)."""
    key: type = cls  # the cache's key (mypy does not take a type[T] for Hashable)
    adapter = _adapter(key)
    errors = _strict_bools(cls, values, ())
    names = _names(cls, values, ())
    building = _building.set((cls, names))
    try:
        built = adapter.validate_python(_over_held_defaults(cls, values))
    except ValidationError as e:
        taken = {tuple(err["loc"]) for err in errors}
        errors += [err for err in e.errors() if tuple(err["loc"]) not in taken]
    finally:
        _building.reset(building)
    if errors:
        raise SettingsError("; ".join(_message(cls, err, name) for err in errors)) from None
    object.__setattr__(built, _GIVEN, names)  # a frozen dataclass: set as its own __init__ sets its fields
    return built


def _held(cls: type) -> Iterator[tuple[Field[Any], type]]:
    """(field, its config class) of every config `cls` holds in a field."""
    hints = get_type_hints(cls, include_extras=True)
    for f in fields(cls):
        target = _strip(hints[f.name])
        if isinstance(target, type) and is_dataclass(target):
            yield f, target


def _names(cls: type, values: Mapping[str, Any], loc: Location) -> frozenset[str]:
    """The names of the settings `values` gives: its keys, and a held config's settings by their dotted names."""
    names = {dotted((*loc, key)) for key in values}
    for f, target in _held(cls):
        if isinstance(values.get(f.name), Mapping):
            names |= _names(target, values[f.name], (*loc, f.name))
    return frozenset(names)


def _over_held_defaults(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values`, a held config's settings given over the settings its field's default holds where they differ
    from its class's defaults (pydantic builds a held config from its class's defaults alone)."""
    merged = dict(values)
    for f, target in _held(cls):
        given_here = values.get(f.name)
        if not isinstance(given_here, Mapping):
            continue
        default = f.default_factory() if callable(f.default_factory) else f.default
        kept = [g.name for g in fields(target) if g.name not in given_here] if is_dataclass(default) else []
        own = {name: getattr(default, name) for name in kept if getattr(default, name) != default_of(target, name)}
        merged[f.name] = {**own, **_over_held_defaults(target, given_here)}
    return merged


@functools.cache
def _adapter(cls: type) -> TypeAdapter[Any]:
    """The validator of `cls`, which must take `CONFIG` (a dataclass it holds takes it from `cls`, or
    declares it too)."""
    outer, *nested = _configs(cls)
    if getattr(outer, "__pydantic_config__", None) is not CONFIG or any(getattr(c, "__pydantic_config__", CONFIG) is not CONFIG for c in nested):
        raise TypeError(f"{cls.__qualname__} and the dataclasses it holds must take __pydantic_config__ = fedcore.settings.CONFIG")
    return TypeAdapter(cls)


def _configs(cls: type) -> list[type]:
    """`cls` and the dataclasses its fields hold, however deep."""
    nested = [_strip(tp) for tp in get_type_hints(cls, include_extras=True).values()]
    return [cls] + [c for tp in nested if isinstance(tp, type) and is_dataclass(tp) for c in _configs(tp)]


def _strict_bools(cls: type, values: Mapping[str, Any], loc: Location) -> list[Mapping[str, Any]]:
    """Errors (in pydantic's form) where a boolean stands for a number or a number for a boolean: pydantic's
    lax mode, which converts the strings '3' and 'true' for a flag or a file of strings, also takes True as 1
    and 1 as True."""
    hints = get_type_hints(cls, include_extras=True)
    errors: list[Mapping[str, Any]] = []
    for key, value in values.items():
        if key not in hints:
            continue  # an unknown setting: pydantic names it
        target = _strip(hints[key])
        if isinstance(target, type) and is_dataclass(target) and isinstance(value, Mapping):
            errors += _strict_bools(target, value, (*loc, key))
        elif isinstance(value, (bool, int, float)) and isinstance(value, bool) != (bool in _scalars(hints[key])):
            errors.append({"loc": (*loc, key), "input": value, "type": "strict_bool"})
    return errors


def _scalars(tp: Any) -> set[Any]:
    """The scalar types a setting of type `tp` takes (a Literal's by its values)."""
    tp = _strip(tp)
    if get_origin(tp) in (Union, types.UnionType):
        return set().union(*(_scalars(a) for a in get_args(tp)))
    if get_origin(tp) is Literal:
        return {type(a) for a in get_args(tp)}
    return {get_origin(tp) or tp}


def _message(cls: type, err: Any, name: Callable[[Location], str]) -> str:
    loc: Location = tuple(err["loc"])
    if not loc:  # the dataclass's own check (__post_init__): its message names the setting
        return str(err.get("ctx", {}).get("error", err["msg"]))
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"unknown setting {name(loc)} (known: {', '.join(_known(cls, loc[:-1]))})"
    if err["type"] == "missing_argument":
        return f"{name(loc)} is required"
    reason = str(err.get("ctx", {}).get("error", "")) if err["type"] == "value_error" else ""
    found = f"; {reason}" if reason else ""  # what a validator of the type found, when it says more
    return f"{name(loc)} = {err['input']!r}: expected {expected(_field_type(cls, loc))}{found}"


def _field_type(cls: type, loc: Location) -> Any:
    """The declared type of the setting at `loc`, nested dataclasses followed, and a tuple's items (`splits.1`:
    the type of --splits' items)."""
    tp: Any = cls
    for part in loc:
        target = _strip(tp)
        if is_dataclass(target) and isinstance(part, str):
            tp = get_type_hints(target, include_extras=True)[part]
        elif isinstance(part, int) and get_origin(target) is tuple and get_args(target)[1:] == (Ellipsis,):
            tp = get_args(target)[0]
        else:
            break
    return tp


def _known(cls: type, loc: Location) -> list[str]:
    target = _strip(_field_type(cls, loc)) if loc else cls
    return [f.name for f in fields(target)] if is_dataclass(target) else []


def _strip(tp: Any) -> Any:
    return get_args(tp)[0] if get_origin(tp) is Annotated else tp


_NAMES = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}


def expected(tp: Any) -> str:
    """What a setting of type `tp` takes, in words: 'an integer in 1..10000', "one of 'huber', 'mse'"."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *metadata = get_args(tp)
        described = [m.words for m in metadata if isinstance(m, Described)]
        if described:
            return described[0]
        intervals = [m for m in metadata if isinstance(m, Interval)]
        bounded = any(m.le is not None or m.lt is not None for m in intervals)
        text = "a number" if base is float and bounded else expected(base)  # within bounds a number is finite
        for m in intervals:
            text += " " + _interval(m, integral=base is int)
        return text
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is tuple and get_args(tp)[1:] == (Ellipsis,) and literal_values(get_args(tp)[0]):
        return "a comma list of " + ", ".join(repr(a) for a in literal_values(get_args(tp)[0]))
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


def literal_values(tp: Any) -> tuple[Any, ...]:
    """The values a setting of type `tp` takes when it is a Literal (or an optional one); () otherwise."""
    tp = _strip(tp)
    if get_origin(tp) in (Union, types.UnionType):
        given = [a for a in get_args(tp) if a is not type(None)]
        return literal_values(given[0]) if len(given) == 1 else ()
    return get_args(tp) if get_origin(tp) is Literal else ()
