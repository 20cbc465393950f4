"""What a server keeps after its programs end must not carry their bulk (issue 18, RSS of
`progserve bench load --rounds 3`): evicted radix leaves that stale heap entries still
reference, owner sets emptied by ended programs, and a streamed variable's deltas."""

from __future__ import annotations

import itertools

from engine_backend.radix_cache import RadixCache
from scheduler.program import VariableSlot


def make_cache() -> RadixCache:
    ticks = itertools.count()
    return RadixCache(eviction="priority", clock=lambda: float(next(ticks)))


def test_an_evicted_leaf_that_stale_heap_entries_hold_keeps_only_its_shell() -> None:
    cache = make_cache()
    for i in range(50):
        prompt = [1000 + i] * 64
        cache.insert(prompt, owner=f"p{i}")
        node = cache.match_prefix(prompt).node
        cache.inc_lock_ref(node)  # a request's lock; its release pushes the leaf again
        cache.dec_lock_ref(node)
    cache.evict(cache.total_size() // 2)  # each evicted leaf leaves its second entry
    dead = {id(entry[-1]): entry[-1] for entry in cache._heap if entry[-1].evicted}
    assert dead, "the touches left stale entries naming evicted leaves"
    for node in dead.values():
        assert node.key == b"" and node.owners is None and node.value is None


def test_owner_sets_emptied_by_ended_programs_are_dropped() -> None:
    cache = make_cache()
    cache.insert([1, 2, 3, 4], owner="a")
    cache.insert([1, 2, 9, 9], owner="b")
    cache.retire_owner("a")
    cache.forget_owner("b")
    nodes = [cache.match_prefix([1, 2, 3, 4], touch=False).node,
             cache.match_prefix([1, 2, 9, 9], touch=False).node,
             cache.match_prefix([1, 2], touch=False).node]
    assert [node.owners for node in nodes] == [None, None, None]


def test_a_finished_streamed_variable_keeps_one_string() -> None:
    slot = VariableSlot("answer")
    for delta in ("The ", "answer ", "is ", "42."):
        slot.append(delta)
    slot.finish()
    assert slot.parts == ["The answer is 42."]
    assert slot.value == "The answer is 42."
