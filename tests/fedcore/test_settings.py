"""Settings as types: values converted or refused in one line; the ranges of what a worker runs, defined once
and applied by the coordinator at start and by a worker to every task."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import pytest
from annotated_types import Interval

from coordinator.config import CoordinatorConfig
from fedcore import settings
from fedcore.errors import SettingOutOfRange, SettingsError
from fedcore.federation.engine import FederationConfig
from fedcore.federation.strategies import Strategy, StrategyName
from fedcore.model.training import SpeedConfig, TrainConfig
from fedcore.model.unet import PRESETS, ModelName
from fedcore.settings import build, expected
from fedcore.wire.convert import eval_task_from_proto, task_from_proto
from fedcore.wire.proto.feddiff.v1 import feddiff_pb2 as pb
from service import flags
from tests.parsers import coordinator_config


@dataclass(frozen=True)
class Inner:
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    __pydantic_config__ = settings.CONFIG

    count: Annotated[int, Interval(ge=1, le=9)] = 1
    rate: Annotated[float, Interval(gt=0, lt=1)] = 0.5
    inner: Inner = Inner()

    def __post_init__(self) -> None:
        if self.count == 7:
            raise ValueError("count 7 is unlucky")


def test_values_are_converted_to_their_declared_types() -> None:
    assert build(Outer, {"count": "3", "rate": "1e-4", "inner": {"mode": "b"}}) == Outer(3, 1e-4, Inner("b"))
    assert build(Outer, {"count": 2.0}).count == 2


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"count": 2.5}, "count = 2.5: expected an integer in 1..9"),
        ({"count": "ten"}, "count = 'ten': expected an integer in 1..9"),
        ({"count": 10}, "count = 10: expected an integer in 1..9"),
        ({"rate": "1e4"}, "rate = '1e4': expected a number in (0, 1)"),
        ({"rate": math.nan}, "rate = nan: expected a number in (0, 1)"),
        ({"inner": {"mode": "c"}}, "inner.mode = 'c': expected one of 'a', 'b'"),
        ({"colour": "red"}, "unknown setting colour (known: count, rate, inner)"),
        ({"count": 7}, "count 7 is unlucky"),
        ({"count": 0, "rate": 2}, "count = 0: expected an integer in 1..9; rate = 2: expected a number in (0, 1)"),
    ],
)
def test_a_value_that_does_not_fit_is_refused_in_one_line_naming_it(values: dict, message: str) -> None:
    with pytest.raises(SettingsError) as e:
        build(Outer, values, name=settings.dotted)
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("tp", "words"),
    [
        (int, "an integer"),
        (str | None, "a string"),
        (bool, "true or false"),
        (settings.Positive, "an integer >= 1"),
        (settings.Seconds, "more than 0 s, up to 604800 s (a week)"),
        (settings.FiniteNonNegative, "a finite number >= 0"),
        (settings.Fraction, "a number in (0, 1]"),
        (settings.Epochs, f"an integer in 1..{settings.MAX_EPOCHS}"),
        (settings.LearningRate, "a number in (0, 1)"),
        (settings.ProgressMode, "one of 'auto', 'bar', 'log', 'off'"),
        (Annotated[tuple[StrategyName, ...], settings.CommaList], "a comma list of 'full', 'usplit', 'udec', 'ulatdec'"),
    ],
)
def test_what_a_type_takes_in_words(tp: object, words: str) -> None:
    assert expected(tp) == words


def test_the_named_choices_are_the_presets_and_the_strategies() -> None:
    assert get_args(ModelName) == tuple(PRESETS)
    assert get_args(StrategyName) == tuple(s.value for s in Strategy)


def test_speed_settings_are_converted_and_checked() -> None:
    assert build(SpeedConfig, {"bf16": "on", "threads": "2"}) == SpeedConfig(bf16="on", threads=2)
    with pytest.raises(SettingsError, match=rf"threads = '-1': expected an integer in 0..{os.cpu_count()}"):
        build(SpeedConfig, {"threads": "-1"})


# --- the ranges of what a worker runs: one definition, two sides --------------------------------------------
def _task(**train: Any) -> pb.Task:
    spec: dict[str, Any] = {"epochs": 1, "batch_size": 8, "lr": 1e-4, "loss": "huber", "seed": 0, **train}
    return pb.Task(kind=pb.Task.TRAIN, round=0, task_id="r0.1-w", receives=["decoder"], returns=["decoder"], train=pb.TrainSpec(**spec))


RANGES = [  # (setting, the last value inside, the first outside)
    ("epochs", settings.MAX_EPOCHS, settings.MAX_EPOCHS + 1),
    ("epochs", 1, 0),
    ("batch_size", settings.MAX_BATCH, settings.MAX_BATCH + 1),
    ("batch_size", 1, 0),
    ("lr", 0.999, 1.0),
    ("lr", 1e-12, 0.0),
    ("lr", 0.5, math.inf),
    ("loss", "mse", "l1"),
]


@pytest.mark.parametrize(("setting", "inside", "outside"), RANGES)
def test_the_coordinator_at_start_and_a_worker_for_each_task_apply_the_same_range(setting: str, inside: object, outside: object) -> None:
    assert getattr(coordinator_config(None, {setting: str(inside)}), setting) == inside
    assert getattr(task_from_proto(_task(**{setting: inside})).train, setting) == inside

    with pytest.raises(SettingsError, match=f"--{setting.replace('_', '-')} = '{outside}': expected "):
        coordinator_config(None, {setting: str(outside)})
    with pytest.raises(SettingOutOfRange, match=f"{setting} = {outside!r}: expected "):
        task_from_proto(_task(**{setting: outside}))


def test_every_training_setting_has_its_range_in_its_type() -> None:
    """The coordinator's training settings and a worker's TrainConfig declare the same types."""
    from typing import get_type_hints

    coordinator, worker = get_type_hints(CoordinatorConfig, include_extras=True), get_type_hints(TrainConfig, include_extras=True)
    assert {name: coordinator[name] for name in worker} == worker


def test_sampling_settings_are_checked_at_start_and_for_each_evaluate_task() -> None:
    for setting, outside in (("eval_samples", settings.MAX_EVAL_SAMPLES + 1), ("eval_steps", settings.MAX_SAMPLING_STEPS + 1), ("eval_steps", 0)):
        with pytest.raises(SettingsError, match=f"--{setting.replace('_', '-')} = '{outside}'"):
            coordinator_config(None, {setting: str(outside)})
    for spec, refused in (({"num_samples": settings.MAX_EVAL_SAMPLES + 1}, "num_samples"), ({"steps": 0}, "steps"), ({"sampler": "euler"}, "sampler")):
        values: dict[str, Any] = {"sampler": "ddim", "steps": 10, "num_samples": 4, "seed": 0, **spec}
        msg = pb.Task(kind=pb.Task.EVALUATE, round=1, task_id="e1-w", receives=["decoder"], eval=pb.EvalSpec(**values))
        with pytest.raises(SettingOutOfRange, match=f"{refused} = "):
            eval_task_from_proto(msg)


def test_a_simulation_refuses_the_same_ranges() -> None:
    with pytest.raises(SettingsError, match=r"lr = 10000.0: expected a number in \(0, 1\)"):
        FederationConfig.from_settings(strategy="udec", model="tiny", rounds=1, clients_per_round=0, seed=0, epochs=1, batch_size=8, lr=1e4, loss="huber")


# --- which settings were given ------------------------------------------------------------------------------


def test_a_setting_given_at_its_default_value_is_not_shown_as_the_default(tmp_path) -> None:
    """'--min-workers 2 (the default)' told a user who passed --min-workers 2 that the flag went unseen."""
    not_given = coordinator_config(None, {"min_workers": None})
    flag = coordinator_config(None, {"min_workers": "2"})
    config_file = tmp_path / "coordinator.yaml"
    config_file.write_text("min-workers: 2\n")
    from_file = coordinator_config(config_file, {})

    assert not_given.min_workers == flag.min_workers == from_file.min_workers == 2
    assert flags.shown(not_given, "min_workers") == "--min-workers 2 (the default)"
    assert flags.shown(flag, "min_workers") == flags.shown(from_file, "min_workers") == "--min-workers 2"
    assert flags.shown(flag, "heartbeat_timeout", "s") == "--heartbeat-timeout 30 s (the default)"
    assert settings.given(flag) == frozenset({"min_workers"})


def test_the_checks_of_a_config_being_built_know_what_was_given() -> None:
    with pytest.raises(SettingsError, match=r"^--min-workers 2 is more than the 1 workers in --worker-sizes"):
        coordinator_config(None, {"worker_sizes": "hospital-1=5", "min_workers": "2"})
    with pytest.raises(SettingsError, match=r"^--min-workers 2 \(the default\) is more than the 1 workers in --worker-sizes"):
        coordinator_config(None, {"worker_sizes": "hospital-1=5"})


def test_a_replaced_config_keeps_what_was_given_and_one_built_in_code_compares_with_the_defaults() -> None:
    cfg = build(Outer, {"count": "1"})
    replaced = settings.replace(cfg, rate=0.25)

    assert replaced.rate == 0.25 and settings.given(replaced) == frozenset({"count"})
    assert not settings.is_default(replaced, "count") and settings.is_default(replaced, "rate")
    assert settings.given(Outer(count=1)) is None and settings.is_default(Outer(count=1), "count")
    assert not settings.is_default(Outer(count=2), "count")
