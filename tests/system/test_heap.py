"""The coordinator process settles its heap after start-up: garbage collected first, the rest frozen."""

from __future__ import annotations

import gc
import weakref

from coordinator.server import settle_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_settling_collects_garbage_then_freezes_what_lives() -> None:
    alive = _Node()
    garbage = _Node()
    dead = weakref.ref(garbage)
    del garbage
    frozen_before = gc.get_freeze_count()
    try:
        settle_heap()

        assert dead() is None  # collected, not kept for ever in the permanent generation
        assert gc.get_freeze_count() > frozen_before
        assert all(o is not alive for o in gc.get_objects())  # frozen: in no generation the collector scans
    finally:
        gc.unfreeze()
