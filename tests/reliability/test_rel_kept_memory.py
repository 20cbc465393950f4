"""What a server keeps after its programs end must not carry their bulk (issue 18, RSS of
`progserve bench load --rounds 3`): evicted radix leaves that stale heap entries still
reference, owner sets emptied by ended programs, a streamed variable's deltas, and an
ended call's spec, dispatch future and its variable's Event."""

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


async def test_an_ended_program_kept_for_state_queries_drops_its_calls_bulk():
    """A kept ended graph program: its LLM calls hold no spec (two pydantic models each)
    and no dispatch future, its variables no Event; its state still answers in full."""
    import asyncio

    from engine_backend.sim import SimConfig, SimEngine
    from scheduler.config import SchedulerConfig
    from scheduler.scheduler import Scheduler
    from scheduler.spec import ProgramSpec

    scheduler = Scheduler([SimEngine(SimConfig(time_scale=0.001, stream_interval=1))],
                          SchedulerConfig())
    await scheduler.start()
    try:
        spec = ProgramSpec.model_validate({"calls": [
            {"id": "c0", "prompt": "plan", "output": "v0", "sampling": {"max_new_tokens": 8}},
            {"id": "c1", "prompt": "act on {{v0}}", "output": "v1",
             "sampling": {"max_new_tokens": 8}}]})
        pid = await scheduler.submit_program(spec)
        program = scheduler.programs.get(pid, "default")
        waiter = asyncio.ensure_future(program.variables["v1"].event().wait())
        await asyncio.wait_for(waiter, 30)
        await scheduler.end_program(pid)
        for call in program.calls.values():
            assert call.spec is None and call.waiter is None
        for slot in program.variables.values():
            assert slot._event is None and len(slot.parts) == 1
        state = scheduler.program_state(pid)
        assert [c.status for c in state.calls] == ["finished", "finished"]
        assert state.variables["v1"] == program.variables["v1"].value
    finally:
        await scheduler.close()
