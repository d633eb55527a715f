"""The one way a command's config is built from its flags (service.flags.build): the flags given over a
settings file over the defaults, a config held in another merged setting by setting, every bad value named by
where it came from (an item of a list by its list's flag), a switch that sets another setting, and a flag's
other spellings."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import pytest

from fedcore import settings
from fedcore.errors import SettingsError
from fedcore.settings import Positive
from service import flags


@dataclass(frozen=True)
class Inner:
    __pydantic_config__ = settings.CONFIG

    mode: Literal["fast", "slow"] = "fast"
    depth: Positive = 1


@dataclass(frozen=True)
class Outer:
    __pydantic_config__ = settings.CONFIG

    count: Positive = 1
    done: bool = True
    inner: Inner = Inner()


MEANING = {"count": "how many", "mode": "how fast", "depth": "how deep"}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, Outer, MEANING, skip=("done",))
    flags.add_switch(parser, "--keep-going", "done", False, "do not stop")
    return parser.parse_args(argv)


def test_the_flags_win_over_the_file_and_a_held_config_takes_both_setting_by_setting(tmp_path: Path) -> None:
    config_file = tmp_path / "settings.yaml"
    config_file.write_text("count: 3\ninner:\n  mode: slow\n  depth: 2\n")

    cfg = flags.build(Outer, _parse(["--depth", "5"]), config_file=config_file)

    assert cfg == Outer(count=3, inner=Inner(mode="slow", depth=5))


def test_a_bad_value_is_named_by_the_flag_or_by_its_key_in_the_file(tmp_path: Path) -> None:
    config_file = tmp_path / "settings.yaml"
    config_file.write_text("count: 0\ninner:\n  mode: slow\n  depth: 0\n")

    with pytest.raises(SettingsError) as e:
        flags.build(Outer, _parse(["--mode", "quick"]), config_file=config_file)

    assert str(e.value) == (
        f"count (in {config_file}) = 0: expected an integer >= 1; --mode = 'quick': expected one of 'fast', 'slow'; "
        f"inner.depth (in {config_file}) = 0: expected an integer >= 1"
    )


def test_a_key_given_in_both_spellings_is_refused(tmp_path: Path) -> None:
    config_file = tmp_path / "settings.yaml"
    config_file.write_text("max-images: 1\nmax_images: 2\n")

    with pytest.raises(SettingsError, match=f"^--config {config_file}: 'max-images' and 'max_images' are one setting, given twice$"):
        flags.build(Outer, _parse([]), config_file=config_file)


def test_a_switch_sets_its_setting_and_the_last_of_it_and_the_setting_s_flag_wins() -> None:
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, Inner, MEANING)
    flags.add_switch(parser, "--slow", "mode", "slow", "same as --mode slow")

    assert flags.build(Outer, _parse([])).done is True
    assert flags.build(Outer, _parse(["--keep-going"])).done is False
    assert flags.build(Inner, parser.parse_args(["--slow"])).mode == "slow"
    assert flags.build(Inner, parser.parse_args(["--mode", "fast", "--slow"])).mode == "slow"
    assert flags.build(Inner, parser.parse_args(["--slow", "--mode", "fast"])).mode == "fast"


def test_a_flag_s_help_says_what_it_does_before_what_it_takes() -> None:
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, Inner, MEANING)

    helps = {a.dest: a.help for a in parser._actions}

    assert helps["mode"] == "how fast: default fast"
    assert helps["depth"] == "how deep: an integer >= 1, default 1"


@pytest.mark.parametrize("meaning", [{"mode": "how fast"}, {"mode": "how fast", "depth": ""}, {"mode": "how fast", "depth": "  "}])
def test_a_setting_without_words_is_refused_before_any_flag_is_added(meaning: dict[str, str]) -> None:
    parser = argparse.ArgumentParser()

    with pytest.raises(ValueError, match=r"^Inner: the flags of depth \(--depth\) have no words: "):
        flags.add_flags(parser, Inner, meaning)
    assert [a.dest for a in parser._actions] == ["help"]


def test_a_held_config_s_settings_and_only_those_not_skipped_need_words() -> None:
    with pytest.raises(ValueError, match=r"^Outer: the flags of mode \(--mode\), depth \(--depth\) have no words: "):
        flags.add_flags(argparse.ArgumentParser(), Outer, {"count": "how many"}, skip=("done",))

    flags.add_flags(argparse.ArgumentParser(), Outer, {"count": "how many"}, skip=("done", "inner"))


Mode = Literal["fast", "slow"]


@dataclass(frozen=True)
class Listed:
    __pydantic_config__ = settings.CONFIG

    modes: Annotated[tuple[Mode, ...], settings.CommaList] = ("fast", "slow")
    target: str = ""


def _listed(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, Listed, {"modes": "modes to run", "target": "where"}, aliases={"target": ("--to",)})
    return parser.parse_args(argv)


def test_a_comma_list_of_choices_is_a_tuple_and_a_wrong_item_is_named_by_the_list_s_flag(tmp_path: Path) -> None:
    config_file = tmp_path / "settings.yaml"
    config_file.write_text("modes: [slow, quick]\n")

    assert flags.build(Listed, _listed(["--modes", "slow, fast,"])).modes == ("slow", "fast")
    with pytest.raises(SettingsError) as from_flag:
        flags.build(Listed, _listed(["--modes", "slow,quick"]))
    with pytest.raises(SettingsError) as from_file:
        flags.build(Listed, _listed([]), config_file=config_file)

    assert str(from_flag.value) == "--modes = 'quick': expected one of 'fast', 'slow'"
    assert str(from_file.value) == f"modes.1 (in {config_file}) = 'quick': expected one of 'fast', 'slow'"


def test_a_comma_list_s_help_lists_the_choices_and_an_alias_sets_the_same_setting() -> None:
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, Listed, {"modes": "modes to run", "target": "where"}, aliases={"target": ("--to",)})

    assert "modes to run: a comma list of 'fast', 'slow', default fast,slow" in " ".join(parser.format_help().split())
    assert flags.build(Listed, _listed(["--to", "there"])).target == "there"
    assert flags.build(Listed, _listed(["--to", "there", "--target", "here"])).target == "here"


@dataclass(frozen=True)
class Deep:
    """A config whose held config has other defaults than its class's (the worker's one-shard split)."""

    __pydantic_config__ = settings.CONFIG

    inner: Inner = Inner(mode="slow", depth=3)
    count: Positive = 1


def _deep(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="deep")
    flags.add_flags(parser, Deep, MEANING, old={"depth": ("--levels",)})
    flags.add_retired(parser, "--seed", "is gone: give --depth")
    return parser.parse_args(argv)


def test_a_held_config_keeps_its_field_s_defaults_under_the_flags_given_and_its_help_shows_them() -> None:
    parser = argparse.ArgumentParser()
    flags.add_flags(parser, Deep, MEANING)

    assert flags.build(Deep, _deep([])).inner == Inner(mode="slow", depth=3)
    cfg = flags.build(Deep, _deep(["--depth", "5"]))
    assert cfg.inner == Inner(mode="slow", depth=5)
    assert settings.is_default(cfg, "inner.mode") and not settings.is_default(cfg, "inner.depth")
    assert flags.shown(cfg, "inner.mode") == "--mode slow (the default)" and flags.shown(cfg, "inner.depth") == "--depth 5"
    assert settings.is_default(Deep(), "inner.depth") and not settings.is_default(Deep(inner=Inner()), "inner.depth")
    assert {a.dest: a.help for a in parser._actions}["depth"] == "how deep: an integer >= 1, default 3"


def test_an_old_spelling_sets_the_setting_with_a_one_line_notice(capsys: pytest.CaptureFixture[str]) -> None:
    assert flags.build(Deep, _deep(["--levels", "4"])).inner.depth == 4
    assert capsys.readouterr().err == "deep: notice: --levels is deprecated, it is spelled --depth now\n"

    assert flags.build(Deep, _deep(["--depth", "4"])).inner.depth == 4
    assert capsys.readouterr().err == ""


def test_a_retired_spelling_is_refused_by_build_in_one_line_naming_its_value() -> None:
    args = _deep(["--count", "2", "--seed", "7"])

    with pytest.raises(SettingsError, match=r"^--seed 7 is gone: give --depth$"):
        flags.build(Deep, args)


def test_a_retired_spelling_is_not_in_the_help() -> None:
    parser = argparse.ArgumentParser()
    flags.add_retired(parser, "--seed", "is gone")

    assert "--seed" not in parser.format_help()
