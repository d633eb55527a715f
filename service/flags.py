"""Command-line flags of typed settings: a flag per setting of a config, its help, choices and default taken
from the setting's type, and the values given gathered for `settings.build`, which converts them in one place
and refuses a bad one in one line that names the flag, the value and what it takes."""

from __future__ import annotations

import argparse
from collections.abc import Collection, Iterator, Mapping
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, TypeVar, get_type_hints

from fedcore import settings

T = TypeVar("T")
REQUIRED = MISSING  # the default of a setting without one: its flag must be given


class Choices(tuple[str, ...]):
    """The values of a Literal setting, for argparse to list (usage, help, shell completion). Every value
    passes the parse: the typed config refuses one outside them in the one line every bad setting gives
    ("--split = 'dirichlet': expected one of 'iid', 'quantity', 'label'"), not argparse in other words."""

    __slots__ = ()

    def __contains__(self, value: object) -> bool:
        return True


def choices(tp: Any) -> Choices | None:
    """The values a setting of type `tp` takes when it is a Literal (or an optional one); None otherwise."""
    values = settings.literal_values(tp)
    return Choices(str(value) for value in values) if values else None


def add_flag(parser: argparse.ArgumentParser, name: str, tp: Any, default: Any = REQUIRED, words: str = "", **options: Any) -> argparse.Action:
    """The flag of setting `name` (`batch_size`: --batch-size): a switch for a boolean, the values of a Literal
    as choices, the help in `settings.flag_help`'s words. Its value stays a string, None when not given, so
    that the setting's default (or a file's value) stands; `options` go to argparse as they are."""
    flag = settings.flag((name,))
    if tp is bool:
        return parser.add_argument(flag, **{"action": "store_const", "const": True, "default": None, "help": words or None, **options})
    shown = None if default is REQUIRED else default
    kwargs = {"default": None, "required": default is REQUIRED, "choices": choices(tp), "help": settings.flag_help(tp, shown, words)}
    return parser.add_argument(flag, **{**kwargs, **options})


def settings_of(cls: type, skip: Collection[str] = ()) -> Iterator[tuple[str, Any, Any]]:
    """(name, type, default) of every setting of the config `cls` but those named in `skip`; those of a config
    it holds in its place, as flags name them (`train.epochs` is --epochs). One without a default has REQUIRED."""
    hints = get_type_hints(cls, include_extras=True)
    for f in fields(cls):
        tp = hints[f.name]
        if f.name in skip:
            continue
        if isinstance(tp, type) and is_dataclass(tp):
            yield from settings_of(tp, skip)
        elif f.default is not MISSING:
            yield f.name, tp, f.default
        else:
            yield f.name, tp, REQUIRED if f.default_factory is MISSING else f.default_factory()


def add_flags(
    parser: argparse.ArgumentParser, cls: type, meaning: Mapping[str, str], *, skip: Collection[str] = (), metavars: Mapping[str, str] | None = None
) -> None:
    """A flag for every setting of `cls` but those in `skip` (`add_flag`), with the words `meaning` has for it
    and the metavar `metavars` names (a path's kind: DIR, FILE)."""
    for name, tp, default in settings_of(cls, skip):
        options = {"metavar": metavars[name]} if metavars and name in metavars else {}
        add_flag(parser, name, tp, default, meaning[name], **options)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of the flags of `cls`'s settings that were given, nested as `cls` holds its configs."""
    hints = get_type_hints(cls, include_extras=True)
    values: dict[str, Any] = {}
    for f in fields(cls):
        tp = hints[f.name]
        value = given(args, tp) if isinstance(tp, type) and is_dataclass(tp) else getattr(args, f.name, None)
        if value not in (None, {}):
            values[f.name] = value
    return values


def build(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """`cls` from the flags given, and `values` for settings that no flag sets as it is (a switch that sets
    another setting); SettingsError (one line) names every flag whose value does not convert."""
    return settings.build(cls, {**given(args, cls), **values}, name=settings.flag)
