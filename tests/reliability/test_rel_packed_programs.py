"""Ended programs past the newest `keep_finished_unpacked` are kept packed (issue 18, RSS
of `progserve bench load --rounds 3`: the kept programs' Python objects pinned the
allocator's arenas round after round). Packed, a program must cost a fraction of its
live form, and read back exactly: its state, its variables, and a reopen that continues
its thread."""

from __future__ import annotations

import gc
import tracemalloc

from engine_backend.sim import SimConfig, SimEngine
from engine_backend.types import GenerateRequest, SamplingParams
from scheduler.config import SchedulerConfig
from scheduler.packed_program import PackedProgram
from scheduler.scheduler import Scheduler
from scheduler.spec import ProgramSpec

CHAIN = {"calls": [
    {"id": "c0", "prompt": "plan the task", "output": "v0", "sampling": {"max_new_tokens": 6}},
    {"id": "c1", "prompt": "act on {{v0}}", "output": "v1", "sampling": {"max_new_tokens": 6}},
    {"id": "c2", "prompt": "check {{v1}}", "output": "v2", "sampling": {"max_new_tokens": 6}},
]}


async def started(**config: int) -> Scheduler:
    scheduler = Scheduler([SimEngine(SimConfig(time_scale=0.0001, stream_interval=1))],
                          SchedulerConfig(**config))
    await scheduler.start()
    return scheduler


async def run_chain(scheduler: Scheduler, pid: str) -> None:
    await scheduler.submit_program(ProgramSpec.model_validate({**CHAIN, "program_id": pid}))
    await scheduler.wait_variable(pid, "v2", timeout=30)
    await scheduler.end_program(pid)


async def chat_turn(scheduler: Scheduler, pid: str, text: str) -> None:
    await scheduler.open_program(pid)
    request = GenerateRequest(rid=f"{pid}-{len(text)}", text=text,
                              sampling=SamplingParams(max_new_tokens=5))
    async for _ in scheduler.llm_call(pid, request):
        pass


def kept(scheduler: Scheduler, pid: str) -> object:
    return scheduler.programs._programs[("default", pid)]


async def test_an_older_ended_program_is_packed_and_reads_back_as_it_was() -> None:
    scheduler = await started(keep_finished_unpacked=2)
    try:
        states = {}
        for i in range(6):
            await run_chain(scheduler, f"p{i}")
            states[f"p{i}"] = scheduler.program_state(f"p{i}").model_dump()
        packed = [pid for pid in states if type(kept(scheduler, pid)) is PackedProgram]
        assert packed == ["p0", "p1", "p2", "p3"]  # the newest two stay as they are
        summary = {s.id: s for s in scheduler.list_programs()}["p0"]
        assert (summary.calls, summary.calls_finished, summary.status) == (3, 3, "finished")
        for pid, state in states.items():
            assert scheduler.program_state(pid).model_dump() == state
        assert type(kept(scheduler, "p0")) is not PackedProgram  # read: unpacked in place
        assert await scheduler.wait_variable("p1", "v1") == states["p1"]["variables"]["v1"]
    finally:
        await scheduler.close()


async def test_a_packed_chat_reopens_with_its_thread_and_history() -> None:
    scheduler = await started(keep_finished_unpacked=0)
    try:
        await chat_turn(scheduler, "chat", "hello")
        await scheduler.end_program("chat")
        await run_chain(scheduler, "other")  # its close packs the chat
        assert type(kept(scheduler, "chat")) is PackedProgram
        await chat_turn(scheduler, "chat", "hello again")
        state = scheduler.program_state("chat")
        first, second = state.calls
        assert second.parents == [first.id] and second.thread_id == first.thread_id
        assert state.history.calls_finished == 2
        assert state.status == "idle"
        await scheduler.end_program("chat")
        assert scheduler.programs.open_count == 0
    finally:
        await scheduler.close()


async def test_forgetting_counts_packed_programs_calls() -> None:
    scheduler = await started(keep_finished_unpacked=0, keep_finished_calls=7)
    try:
        for i in range(5):
            await run_chain(scheduler, f"p{i}")
        left = [pid for pid in (f"p{i}" for i in range(5))
                if ("default", pid) in scheduler.programs]
        assert left == ["p3", "p4"]  # 6 calls kept; a third program would make 9
    finally:
        await scheduler.close()


async def test_kept_programs_cost_a_fraction_packed() -> None:
    """What 150 kept 3-call programs add, packed and as they are, over keeping none (the
    engine's cache and the store's history are the same on every side)."""
    async def traced_growth(**config: int) -> int:
        scheduler = await started(**config)
        try:
            await run_chain(scheduler, "warm")
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            for i in range(150):
                await run_chain(scheduler, f"p{i}")
            gc.collect()
            return tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            await scheduler.close()

    floor = await traced_growth(keep_finished_programs=0)
    live = await traced_growth(keep_finished_unpacked=10_000) - floor
    packed = await traced_growth(keep_finished_unpacked=0) - floor
    print(f"kept 150 programs: {live} bytes as they are, {packed} packed")
    assert packed * 3 < live, (packed, live)
