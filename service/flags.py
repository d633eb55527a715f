"""Command-line flags of typed settings: a flag per setting of a config, its help, choices and default taken
from the setting's type; and `build`, the one way a command's config is made from them: the flags given over a
settings file's values (--config) over the defaults, each converted in one place (`settings.build`), a bad one
refused in one line that names the flag (or the file's key), the value and what it takes. A setting's flag
(`flag`), its help (`flag_help`) and a message's words for it (`shown`) are spelled here, the command line's
business; fedcore's typed-config machinery (`fedcore.settings`) knows settings by name only."""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Collection, Hashable, Iterator, Mapping, Sequence
from dataclasses import MISSING, Field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml
from pydantic import TypeAdapter, ValidationError

from fedcore import settings
from fedcore.errors import SettingsError

T = TypeVar("T")
REQUIRED = MISSING  # the default of a setting without one: its flag must be given
# A field's metadata for a string setting whose empty value means something, which its flag's help says
# (`field(default="", metadata=EMPTY_MEANS_SOMETHING)`): `build` refuses any other flag given empty.
EMPTY_MEANS_SOMETHING = {"flags.empty_means_something": True}


def flag(loc: settings.Location) -> str:
    """A setting's command-line flag: `batch_size` and `speed.batch_size` are both --batch-size; an item of a
    list (`splits.1`, the second of --splits a,b) is named by its setting's flag."""
    name = next(part for part in reversed(loc) if isinstance(part, str))
    return "--" + name.replace("_", "-")


def shown(config: object, name: str, unit: str = "") -> str:
    """A setting as a message names it: its flag and value, and "(the default)" when it was not given, so that
    a message about a setting the user never gave says so ("--heartbeat-timeout 30 s (the default)")."""
    value = settings.value_of(config, name)
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{flag(tuple(name.split('.')))} {text}{f' {unit}' if unit else ''}{' (the default)' if settings.is_default(config, name) else ''}"


def flag_help(tp: Any, default: Any = None, words: str = "") -> str:
    """A flag's help: its meaning (`words`), then the type and range its setting declares, in the words of
    `settings.expected`, and its default: "local epochs per round: an integer in 1..10000, default 5". A switch (a
    boolean), a free string (a path, an address) and free strings (a repeatable flag) have their meaning alone,
    and their default if any; so does a Literal, whose values the flag lists as its choices."""
    typed = [] if tp in (bool, str, str | None, tuple[str, ...]) or settings.literal_values(tp) else [settings.expected(tp)]
    defaults = [] if default in (None, "") or tp is bool else [f"default {default}"]
    text = ", ".join(typed + defaults)
    return f"{words}: {text}" if words and text else words or text


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (it would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """A YAML document (JSON is one too) as Python values, safely; yaml.YAMLError, with the line, for text that
    is not YAML and for a key given twice in one mapping."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds plain values only


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


class _Spelled(argparse.Action):
    """A flag's value stored as `store` (or, with no argument, `store_const`) stores it; given by one of its
    `old` spellings, a one-line notice on stderr names the flag's own, or `spelled` (the old spelling still
    works)."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, old: Sequence[str] = (), spelled: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.old = tuple(old)
        self.spelled = spelled or self.option_strings[0]

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        if option_string in self.old:
            print(f"{parser.prog}: notice: {option_string} is deprecated, it is spelled {self.spelled} now", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, each flag listed by its spellings of today: an old one (`_Spelled.old`) still works,
    with a notice, but the help does not list it beside the flag it repeats."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        old = getattr(action, "old", ())
        if not old or not action.option_strings:
            return super()._format_action_invocation(action)
        shown = copy.copy(action)
        shown.option_strings = [s for s in action.option_strings if s not in old]
        return super()._format_action_invocation(shown)


def add_flag(
    parser: argparse.ArgumentParser, name: str, tp: Any, default: Any, words: str, *, aliases: Sequence[str] = (), old: Sequence[str] = (), **options: Any
) -> argparse.Action:
    """The flag of setting `name` (`batch_size`: --batch-size), its `aliases` (other spellings of it) and its
    `old` spellings (which still work, with a notice that names the flag): a switch for a boolean, the values
    of a Literal as choices, the help in `flag_help`'s words: `words` (what the flag does), then its
    type's (a tuple's default as the comma list its flag takes; an empty one's and an empty mapping's not at
    all). Its value stays a string, None when not given, so that the setting's default (REQUIRED: none) or a
    file's value stands; `options` go to argparse as they are."""
    spellings = (flag((name,)), *aliases, *old)
    noticed = {"action": _Spelled, "old": tuple(old)} if old else {}  # argparse's own actions where no old spelling
    if tp is bool:
        switch = {"action": "store_const", "const": True, "default": None, "help": words}
        return parser.add_argument(*spellings, **{**switch, **({**noticed, "nargs": 0} if old else {}), **options})
    in_help = ",".join(map(str, default)) if isinstance(default, tuple) else None if default is REQUIRED or default == {} else default
    kwargs = {"default": None, "required": default is REQUIRED, "choices": choices(tp), "help": flag_help(tp, in_help, words), **noticed}
    return parser.add_argument(*spellings, **{**kwargs, **options})


_RETIRED = "_flags_retired"  # the retired spellings given (`add_retired`), refused by `build`


class _Retired(argparse.Action):
    """A spelling that no longer names a setting of this command: kept for `build`, which refuses it."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, words: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.words = words

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        spelled = option_string if values is None else f"{option_string} {values}"
        setattr(namespace, _RETIRED, [*getattr(namespace, _RETIRED, []), f"{spelled} {self.words}"])


def add_retired(parser: argparse.ArgumentParser, spelling: str, words: str) -> argparse.Action:
    """A flag this command took once, with another meaning than the one other commands give it, and that now
    names nothing here: `build` refuses it in one line, `spelling` followed by `words` (what to give instead),
    rather than argparse's "unrecognized arguments". The help does not show it."""
    return parser.add_argument(spelling, action=_Retired, words=words, nargs="?", dest=_RETIRED + spelling, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_switch(parser: argparse.ArgumentParser, flag: str, name: str, value: object, words: str) -> argparse.Action:
    """A switch `flag` that gives setting `name` the value `value` (--keep-running: exit_when_done false), as
    that setting's own flag would: the last of the two given wins."""
    return parser.add_argument(flag, dest=name, action="store_const", const=value, default=None, help=words)


def add_old_switch(parser: argparse.ArgumentParser, flag: str, name: str, value: object, spelled: str) -> argparse.Action:
    """A switch this command took once, `flag`, that gives setting `name` the value `value` as `spelled` (its
    flag and that value: --no-compile, now --compile off) does: it still works, with the notice an old
    spelling gives, and the help does not list it beside the flag it repeats."""
    return parser.add_argument(flag, dest=name, action=_Spelled, nargs=0, const=value, default=None, old=(flag,), spelled=spelled, help=argparse.SUPPRESS)


def settings_of(cls: type, skip: Collection[str] = (), held: object = None) -> Iterator[tuple[str, Any, Any]]:
    """(name, type, default) of every setting of the config `cls` but those named in `skip`; those of a config
    it holds in its place, as flags name them (`train.epochs` is --epochs), with the defaults of the config its
    field holds by default (`held`). One without a default has REQUIRED."""
    hints = get_type_hints(cls, include_extras=True)
    for f in fields(cls):
        tp = hints[f.name]
        if f.name in skip:
            continue
        default = getattr(held, f.name) if held is not None else _default(f)
        if isinstance(tp, type) and is_dataclass(tp):
            yield from settings_of(tp, skip, default if is_dataclass(default) else None)
        else:
            yield f.name, tp, default


def _default(f: Field[Any]) -> Any:
    """A field's default; REQUIRED for one without."""
    if f.default is not MISSING:
        return f.default
    return REQUIRED if f.default_factory is MISSING else f.default_factory()


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    meaning: Mapping[str, str],
    *,
    skip: Collection[str] = (),
    metavars: Mapping[str, str] | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
    old: Mapping[str, Sequence[str]] | None = None,
    shown_defaults: Mapping[str, str] | None = None,
) -> None:
    """A flag for every setting of `cls` but those in `skip` (`add_flag`), with the words `meaning` has for it,
    the metavar `metavars` names (a path's kind: DIR, FILE), the other spellings `aliases` gives it
    (--coordinator for --address), the `old` spellings it had (each still works, with a notice) and, where
    `shown_defaults` names one, the default its help shows (one the command settles otherwise: "the
    protocol's"). ValueError, before any flag is added, when `meaning` has no words for one of them: a flag's
    help says what it does, not only what it takes."""
    found = list(settings_of(cls, skip))
    wordless = [name for name, _, _ in found if not meaning.get(name, "").strip()]
    if wordless:
        named = ", ".join(f"{name} ({flag((name,))})" for name in wordless)
        raise ValueError(f"{cls.__name__}: the flags of {named} have no words: give each what it does in the meaning its command passes")
    for name, tp, default in found:
        options = {"metavar": metavars[name]} if metavars and name in metavars else {}
        if shown_defaults and name in shown_defaults:
            options["help"] = flag_help(tp, shown_defaults[name], meaning[name])
        spelled = {"aliases": aliases.get(name, ()) if aliases else (), "old": old.get(name, ()) if old else ()}
        add_flag(parser, name, tp, default, meaning[name], **spelled, **options)


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


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in a YAML file (--config), by name: its keys as the settings' names, with dashes or
    underscores. SettingsError (one line, the file and what is wrong) when the file cannot be read, is not a
    YAML mapping, or gives a setting twice in the two spellings."""
    try:
        raw = load_yaml(path.read_text()) or {}
    except OSError as e:
        raise SettingsError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise SettingsError(f"--config {path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"--config {path}: expected a mapping of settings, got {type(raw).__name__}")
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        other = spelled.setdefault(name, str(key))
        if other != str(key):
            raise SettingsError(f"--config {path}: {other!r} and {str(key)!r} are one setting, given twice")
        values[name] = value
    return values


def build(cls: type[T], args: argparse.Namespace, *, config_file: str | Path | None = None) -> T:
    """`cls` from its defaults, under the settings of `config_file` (`read_config_file`; None: no file), under
    the flags given in `args`: each value converted to its setting's type (`settings.build`). SettingsError
    (one line) names every value that does not convert by where it came from: a flag's by the flag
    ("--batch-size = '0': ..."), a file's by its key in the file ("rounds (in FILE) = 2.5: ...")."""
    retired = getattr(args, _RETIRED, None)
    if retired:
        raise SettingsError("; ".join(retired))
    if config_file == "":
        raise SettingsError("--config = '': expected a YAML file of settings; the flag is given empty")
    from_file = read_config_file(Path(config_file)) if config_file else {}
    from_flags = given(args, cls)
    empty = _given_empty(cls, from_flags, ())
    if empty:
        raise SettingsError("; ".join(f"{flag(loc)} = '': expected {settings.expected(tp)}; the flag is given empty" for loc, tp in empty))

    def name(loc: settings.Location) -> str:
        in_file = _holds(from_file, loc) and not _holds(from_flags, loc)
        return f"{settings.dotted(loc)} (in {config_file})" if in_file else flag(loc)

    return settings.build(cls, _layered(from_file, from_flags), name=name)


def _given_empty(cls: type, values: Mapping[str, Any], loc: settings.Location) -> list[tuple[settings.Location, Any]]:
    """(location, type) of each setting of `values` (the flags given) that is an empty string its type takes (as
    "not used", its default): a flag given empty (`--worker-id ''`, a variable that expanded to nothing) must
    not mean the same as no flag, silently. A field marked EMPTY_MEANS_SOMETHING takes it; a type that refuses
    "" itself says why in its own words (`settings.build`)."""
    hints = get_type_hints(cls, include_extras=True)
    found: list[tuple[settings.Location, Any]] = []
    for f in fields(cls):
        if f.name not in values:
            continue
        value, tp = values[f.name], hints[f.name]
        if isinstance(value, dict) and isinstance(tp, type) and is_dataclass(tp):
            found += _given_empty(tp, value, (*loc, f.name))
        elif value == "" and not f.metadata.get(next(iter(EMPTY_MEANS_SOMETHING))) and _takes_empty(tp):
            found.append(((*loc, f.name), tp))
    return found


def _takes_empty(tp: Any) -> bool:
    """Whether a setting of type `tp` takes the empty string."""
    try:
        TypeAdapter(tp, config=settings.CONFIG).validate_python("")
    except ValidationError:
        return False
    return True


def _layered(under: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over`'s values over `under`'s; the settings of a config held in another, one by one."""
    merged = dict(under)
    for key, value in over.items():
        below = merged.get(key)
        merged[key] = _layered(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return merged


def _holds(values: Any, loc: settings.Location) -> bool:
    """Whether `values` (nested as the config holds its configs) gives the setting at `loc`, or the whole value
    it is part of."""
    for part in loc:
        if not isinstance(values, dict):
            return True
        if part not in values:
            return False
        values = values[part]
    return True
