"""`ServerCollector`: full GC passes skip what survived the previous one, a periodic
pass over everything still frees old cyclic garbage, and every pause is timed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from progserve.gc_tuning import FULL_PASS_THRESHOLD, ServerCollector


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def collector() -> Iterator[ServerCollector]:
    gc.unfreeze()
    frozen = ServerCollector(full_scan_interval_s=3600)
    frozen.install()
    try:
        yield frozen
    finally:
        frozen.close()
        gc.unfreeze()


def cycle() -> tuple[list[Node], weakref.ref[Node]]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return [a], weakref.ref(a)


def test_survivors_of_a_full_pass_are_frozen(collector: ServerCollector) -> None:
    start = gc.get_freeze_count()
    assert start > 0  # what start-up built
    kept = [Node() for _ in range(1000)]
    gc.collect()
    assert gc.get_freeze_count() >= start + len(kept)
    assert not [o for o in gc.get_objects() if isinstance(o, Node)]  # none left to walk


def test_old_cycles_are_freed_by_the_periodic_full_scan(collector: ServerCollector) -> None:
    holder, alive = cycle()
    gc.collect()  # the cycle survives (held) and is frozen
    holder.clear()  # now it is garbage, but frozen: ordinary passes skip it
    gc.collect()
    assert alive() is not None and collector.full_scans == 0
    collector.full_scan_interval_s = 0.0  # the interval has passed
    gc.collect()
    assert alive() is None and collector.full_scans == 1


def test_close_unfreezes_and_stops_freezing() -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    frozen = ServerCollector(full_scan_interval_s=3600)
    frozen.install()
    # full passes walk only new objects now: one after every middle-generation pass
    assert gc.get_threshold() == (*before[:2], FULL_PASS_THRESHOLD)
    frozen.close()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
    kept = [Node() for _ in range(10)]
    gc.collect()
    assert gc.get_freeze_count() == 0 and kept


def test_every_pause_is_timed_and_interval_zero_changes_nothing_else() -> None:
    gc.unfreeze()
    pauses: list[tuple[int, float]] = []
    watch = ServerCollector(full_scan_interval_s=0, on_pause=lambda g, s: pauses.append((g, s)))
    watch.install()
    try:
        kept = [Node() for _ in range(100)]
        gc.collect()
        gc.collect(0)
        assert gc.get_freeze_count() == 0 and kept  # timing only
    finally:
        watch.close()
    assert [g for g, _ in pauses] == [2, 0]
    assert all(0 <= s < 5 for _, s in pauses)
