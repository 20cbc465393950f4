"""What a server keeps after programs end is bounded by memory, not only by count
(`progserve bench load --rounds 3` grew 205 -> 300 -> 392 MB, +90%):

- the trace ring's spans cost what they weigh: orjson returns its whole output buffer
  (about 8 KB behind a 1 KB span), which made `trace_max_spans` spans eight times the
  memory they were meant to be;
- kept finished programs are bounded by their calls too (`keep_finished_calls`), since a
  program's count says nothing of its size; the newest ended program always stays;
- a finished graph call forgets its task (the task, its coroutine and its context were
  kept with every kept program)."""

from __future__ import annotations

import asyncio
import tracemalloc

import httpx

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime
from progserve.trace_store import TraceStore, program_key


def a_span(i: int) -> dict:
    return {"span_id": f"{i:016x}", "trace_id": "0" * 32, "parent_id": None,
            "name": "llm call", "kind": "llm", "program_id": "p", "program_key":
            program_key("default", f"p{i // 4}"), "tenant": "default", "call_id": f"c{i}",
            "start_ns": i, "end_ns": i + 1, "status": "ok", "error": None,
            "attributes": {f"progserve.attr.{k}": k * 1.5 for k in range(30)},
            "events": [{"name": "dispatched", "time_ns": i, "attributes": {}}]}


def test_the_span_ring_costs_what_its_spans_weigh():
    store = TraceStore("i1", max_spans=2_000, max_programs=1_000)
    spans = [a_span(i) for i in range(2_000)]
    tracemalloc.start()
    try:
        for span in spans:
            store.add_span(span)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    blob = sum(len(blob) for blobs in store._spans.values() for blob in blobs)
    assert held < 1.6 * blob + 300_000, f"{held / blob:.1f}x the spans' own size"


async def test_kept_programs_are_bounded_by_their_calls():
    settings = Settings(sim={"time_scale": 0.001},
                        scheduler={"keep_finished_programs": 1_000, "keep_finished_calls": 30})
    runtime = ServerRuntime(settings)
    app = create_app(runtime)
    await runtime.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://progserve", timeout=60) as client:
            for i in range(40):
                spec = {"calls": [{"id": f"c{k}", "prompt": f"task {i} step {k}",
                                   "output": f"v{k}", "sampling": {"max_new_tokens": 4}}
                                  for k in range(3)]}
                pid = (await client.post("/v1/programs", json=spec)).json()["program_id"]
                assert (await client.get(f"/v1/programs/{pid}/variables/v2",
                                         params={"timeout": 30})).status_code == 200
                assert (await client.post(f"/v1/programs/{pid}/end")).status_code == 200
            big = {"calls": [{"id": f"b{k}", "prompt": "big", "output": f"w{k}",
                              "sampling": {"max_new_tokens": 2}} for k in range(40)]}
            pid = (await client.post("/v1/programs", json=big)).json()["program_id"]
            assert (await client.get(f"/v1/programs/{pid}/variables/w39",
                                     params={"timeout": 30})).status_code == 200
            assert (await client.post(f"/v1/programs/{pid}/end")).status_code == 200
            await asyncio.sleep(0.05)
            kept = runtime.scheduler.list_programs()
            # the 40-call program alone is over the budget: it stays (newest), alone
            assert [p.id for p in kept] == [pid]
            state = (await client.get(f"/v1/programs/{pid}")).json()
            assert len(state["calls"]) == 40
            assert all(call.task is None
                       for program in runtime.scheduler.programs
                       for call in program.calls.values())
    finally:
        await runtime.close()


async def test_a_program_forgotten_while_its_calls_end_leaves_the_table():
    """A cancelled program whose running call is still being aborted when it falls out of
    the kept ones stayed in the program table for good (a leak per such program)."""
    from engine_backend.sim import SimConfig, SimEngine
    from scheduler.config import SchedulerConfig
    from scheduler.scheduler import Scheduler
    from scheduler.spec import ProgramSpec

    scheduler = Scheduler([SimEngine(SimConfig(time_scale=0.05))],
                          SchedulerConfig(keep_finished_programs=0))
    await scheduler.start()
    try:
        spec = ProgramSpec.model_validate({"calls": [{"id": "c", "prompt": "long", "output": "v",
                                                      "sampling": {"max_new_tokens": 4000}}]})
        pid = await scheduler.submit_program(spec)
        program = scheduler.programs.get(pid, "default")
        while not program.running:
            await asyncio.sleep(0.01)
        await scheduler.cancel_program(pid)
        assert program.open_calls  # ended, past the kept ones, its call still aborting
        for _ in range(500):
            if program.open_calls == 0:
                break
            await asyncio.sleep(0.01)
        assert program.open_calls == 0
        assert ("default", pid) not in scheduler.programs
    finally:
        await scheduler.close()
