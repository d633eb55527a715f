"""One worker id, one live worker: the registry tells a restart (the same installation) from a second
claimant (another installation), which is refused while the first one's session is live."""

from __future__ import annotations

from dataclasses import replace

import pytest

from coordinator.registry import WorkerInfo, WorkerRecord, WorkerRegistry
from fedcore.errors import DuplicateWorker, UnknownWorker

TIMEOUT = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(registry: WorkerRegistry, worker_id: str) -> WorkerRecord:
    record = registry.record(worker_id)
    assert record is not None, f"no record of {worker_id!r}"
    return record


def _info(installation: str, instance: str = "p1", worker_id: str = "hospital-1") -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id, device="cpu", gpu_name="", gpu_memory_bytes=0, num_examples=10, software_version=f"feddiff 1 on host-{installation}",
        has_private_state=False, installation_id=installation, instance_id=instance,
    )  # fmt: skip


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(clock: Clock) -> WorkerRegistry:
    return WorkerRegistry(TIMEOUT, clock=clock)


def test_the_same_installation_joining_again_replaces_its_session_at_once(registry: WorkerRegistry) -> None:
    old, _ = registry.join(_info("a" * 32, "p1"))

    new, replaced = registry.join(_info("a" * 32, "p2"))  # its process restarted

    assert replaced is not None and replaced.session_id == old
    assert registry.touch(new).info.instance_id == "p2"
    with pytest.raises(UnknownWorker):
        registry.touch(old)


def test_another_installation_is_refused_while_the_first_is_live_and_the_first_keeps_its_session(registry: WorkerRegistry, clock: Clock) -> None:
    first, _ = registry.join(_info("a" * 32))
    clock.now += TIMEOUT  # heard exactly a heartbeat timeout ago: still live

    with pytest.raises(DuplicateWorker) as refused:
        registry.join(_info("b" * 32))

    assert refused.value.reason == "duplicate_worker"
    assert str(refused.value).startswith(
        f"worker id 'hospital-1' is held by a live session of another installation (installation '{'a' * 12}', feddiff 1 on host-{'a' * 32}, heard 30.0s ago)"
    )
    assert registry.touch(first).info.installation_id == "a" * 32
    assert [r.info.installation_id for r in registry.connected()] == ["a" * 32]


def test_another_installation_is_accepted_once_the_first_is_unheard_for_the_heartbeat_timeout(registry: WorkerRegistry, clock: Clock) -> None:
    first, _ = registry.join(_info("a" * 32))
    clock.now += TIMEOUT + 0.1

    second, replaced = registry.join(_info("b" * 32))

    assert replaced is None, "the first session was no longer live"
    assert registry.touch(second).info.installation_id == "b" * 32
    with pytest.raises(UnknownWorker):
        registry.touch(first)


def test_another_installation_is_accepted_once_the_first_has_left(registry: WorkerRegistry) -> None:
    first, _ = registry.join(_info("a" * 32))
    assert registry.leave(first) == "hospital-1" and registry.leave(first) is None, "a session ends once"

    second, replaced = registry.join(_info("b" * 32))

    assert replaced is None and registry.touch(second).worker_id == "hospital-1"


def test_a_leave_of_a_session_a_restart_replaced_ends_nothing(registry: WorkerRegistry) -> None:
    first, _ = registry.join(_info("a" * 32, "p1"))
    second, replaced = registry.join(_info("a" * 32, "p2"))

    assert replaced is not None and registry.leave(first) is None
    assert [r.worker_id for r in registry.connected()] == ["hospital-1"] and registry.touch(second).worker_id == "hospital-1"


def test_a_worker_without_installation_id_cannot_take_over_a_live_one_that_has_one(registry: WorkerRegistry) -> None:
    registry.join(_info("a" * 32))
    with pytest.raises(DuplicateWorker, match="this one is an installation without id"):
        registry.join(_info(""))


def test_workers_without_installation_ids_replace_each_other_as_before(registry: WorkerRegistry) -> None:
    old, _ = registry.join(_info(""))  # both predate installation ids: a restart cannot be told from a twin

    new, replaced = registry.join(_info(""))

    assert replaced is not None and replaced.session_id == old and registry.touch(new)


def test_another_installation_taking_an_id_over_holds_none_of_its_private_parts_whatever_it_says(registry: WorkerRegistry, clock: Clock) -> None:
    registry.join(replace(_info("a" * 32, "p1"), has_private_state=True))
    clock.now += TIMEOUT + 0.1
    registry.join(replace(_info("b" * 32, "p2"), has_private_state=True))  # private parts, but not the ones the run gave this id
    assert _record(registry, "hospital-1").info.has_private_state is False

    registry.join(replace(_info("b" * 32, "p3"), has_private_state=True))  # the same installation again: its claim stands
    assert _record(registry, "hospital-1").info.has_private_state is True


def test_other_worker_ids_do_not_conflict(registry: WorkerRegistry) -> None:
    registry.join(_info("a" * 32, worker_id="hospital-1"))
    registry.join(_info("b" * 32, worker_id="hospital-2"))
    assert [r.worker_id for r in registry.connected()] == ["hospital-1", "hospital-2"]


# --- departed workers are forgotten; a bounded listing ------------------------------------------------------
def test_a_departed_worker_is_forgotten_after_the_retention_and_its_session_ends(clock: Clock) -> None:
    registry = WorkerRegistry(TIMEOUT, departed_retention=60.0, clock=clock)
    left, _ = registry.join(_info("a" * 32, worker_id="left"))
    silent, _ = registry.join(_info("b" * 32, worker_id="silent"))
    live, _ = registry.join(_info("c" * 32, worker_id="live"))
    registry.leave(left)

    clock.now += 60.0  # left 60 s ago: kept; silent departed 30 s ago (its heartbeat timeout ran out)
    registry.touch(live)
    assert [r.worker_id for r in registry.all()] == ["left", "live", "silent"]
    clock.now += 0.5
    registry.touch(live)
    assert [r.worker_id for r in registry.all()] == ["live", "silent"]
    clock.now += 30.0
    registry.touch(live)

    assert [r.worker_id for r in registry.all()] == ["live"]
    with pytest.raises(UnknownWorker):
        registry.check_session(silent)
    with pytest.raises(UnknownWorker):
        registry.touch(silent)
    registry.join(_info("b" * 32, worker_id="silent"))  # it joins again
    assert [r.worker_id for r in registry.connected()] == ["live", "silent"]


def test_the_listing_is_bounded_connected_workers_first_then_the_most_recently_heard(clock: Clock) -> None:
    registry = WorkerRegistry(TIMEOUT, clock=clock)
    registry.join(_info("old", worker_id="old"))
    registry.join(_info("older", worker_id="older"))
    recent, _ = registry.join(_info("recent", worker_id="recent"))
    clock.now += 1.0
    registry.touch(recent)
    clock.now += TIMEOUT + 0.5  # none of the three is connected now; "recent" was heard last
    registry.join(_info("b", worker_id="b-live"))
    registry.join(_info("a", worker_id="a-live"))

    listed, omitted, connected = registry.listing(3)

    assert [r.worker_id for r in listed] == ["a-live", "b-live", "recent"]
    assert (omitted, connected) == (2, 2)
    assert registry.listing(10)[1] == 0
