"""The ranks' commands through a real TCP store: a rank stopped as it waits and rank 0 about to post a task
never both get their way (the store's compare-and-set decides), so that neither waits on the other."""

from __future__ import annotations

import datetime
import threading

import pytest
import torch.distributed as dist

from fedcore.federation.client import TrainTask
from fedcore.model.parts import Part
from fedcore.model.ranks import Ranks
from fedcore.model.training import TrainConfig, TrainingInterrupted
from worker.team import Command, Team

ALL = frozenset(Part)
TASK = TrainTask(0, "r0.1-client-0", ALL, ALL, frozenset(), TrainConfig(epochs=1, batch_size=4), seed=3)


def _teams() -> tuple[Team, Team]:
    """Rank 0 and rank 1 of two, on one store (their process group is not needed by the commands)."""
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=5))
    teams = []
    for rank in (0, 1):
        team = Team.__new__(Team)
        team.ranks, team.store, team.sent = Ranks(rank, 2), dist.PrefixStore("feddiff", store), 0
        teams.append(team)
    return teams[0], teams[1]


def test_a_rank_stopped_as_it_waits_stops_at_once_and_rank_0_does_not_start_the_task() -> None:
    leader, follower = _teams()
    stopped = threading.Event()
    stopped.set()
    assert follower.next_command(stopped) == Command("stop")
    with pytest.raises(TrainingInterrupted):  # before any collective: the stopped rank is gone
        leader.start_training("tiny", TASK, model=None)  # type: ignore[arg-type]


def test_a_task_rank_0_posted_first_is_trained_by_a_rank_stopped_since() -> None:
    leader, follower = _teams()
    posted = leader._claim(Command("train", "tiny", TASK.train, TASK.seed))
    stopped = threading.Event()
    stopped.set()
    assert follower.next_command(stopped) == posted == Command("train", "tiny", TASK.train, TASK.seed)
    leader.stop(0)
    assert follower.next_command() == Command("stop", exit_code=0)


def test_a_waiting_rank_gets_rank_0s_commands_in_order() -> None:
    leader, follower = _teams()
    got: list[Command] = []
    reader = threading.Thread(target=lambda: got.extend([follower.next_command(), follower.next_command()]))
    reader.start()
    leader._claim(Command("train", "tiny", TASK.train, TASK.seed))
    leader.stop(3)
    reader.join(10)
    assert got == [Command("train", "tiny", TASK.train, TASK.seed), Command("stop", exit_code=3)]
