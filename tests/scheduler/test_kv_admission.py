"""KV-aware program admission (scheduler/kv_admission.py): new programs wait while the
admitted programs' KV footprint fills the replicas' KV; nothing is lost while they wait."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from sched_fake_engine import FakeEngine
from test_sched_service import consume, req, run

from engine_backend.virtual_time import run_virtual
from scheduler.config import SchedulerConfig
from scheduler.events import EventKind
from scheduler.kv_admission import KvAdmission
from scheduler.program import CallNode, Program
from scheduler.scheduler import Scheduler

KV = 1000  # the fake replica's KV tokens; prompts are one token per character


def text(n: int) -> str:
    return "x" * n


async def fill_the_kv_and_hold_one(s: Scheduler) -> tuple[str, str, asyncio.Future]:
    """Program a's context fills the KV; program b's first call then waits."""
    a = await s.open_program("a")
    await consume(s.llm_call(a, req("a1", n=4, text=text(996))))
    b = await s.open_program("b")
    held = asyncio.ensure_future(consume(s.llm_call(b, req("b1", n=2))))
    await asyncio.sleep(1)
    assert s.queued() == 1 and "b1" not in s.engines[0].started
    return a, b, held


def test_a_new_program_waits_until_the_admitted_ones_fit_then_runs_first_come_first():
    async def body(s: Scheduler, engines):
        eng = engines[0]
        a, b = await s.open_program("a"), await s.open_program("b")
        await consume(s.llm_call(a, req("a1", n=4, text=text(896))))  # footprint 900
        await consume(s.llm_call(b, req("b1", n=4, text=text(196))))  # 900 + 200 >= KV
        assert s.admission.demand == 1100
        c, d = await s.open_program("c"), await s.open_program("d")
        held_c = asyncio.ensure_future(consume(s.llm_call(c, req("c1", n=2))))
        held_d = asyncio.ensure_future(consume(s.llm_call(d, req("d1", n=2))))
        await asyncio.sleep(5)
        assert "c1" not in eng.started and "d1" not in eng.started
        stats = await s.stats()
        assert stats.admission_held_programs == 2 and stats.queued == 2
        assert stats.admission_kv_demand_tokens == 1100
        await s.end_program(a)  # 200 left: both fit, and c was first
        c_chunks, d_chunks = await held_c, await held_d
        assert eng.started[-2:] == ["c1", "d1"]
        assert c_chunks[-1].completion_tokens == 2 and d_chunks[-1].completion_tokens == 2
        assert s.admission.delayed == 2 and s.queued() == 0
        (waited,) = s.program_state(c).calls
        assert waited.queue_wait_s >= 5  # the hold counts as queueing

    run(body, FakeEngine(kv_capacity=KV), kv_admission=True, kv_admission_fill=1.0)


def test_a_held_call_is_announced_as_queued_once_when_it_starts_waiting():
    async def body(s: Scheduler, engines):
        events = []
        s.add_listener(events.append, kinds=[EventKind.CALL_QUEUED, EventKind.CALL_DISPATCHED])
        a, b, held = await fill_the_kv_and_hold_one(s)  # b is held at t=~0.04
        await s.end_program(a)
        await held
        queued = [e for e in events if e.program_id == b and e.kind is EventKind.CALL_QUEUED]
        dispatched = [e for e in events
                      if e.program_id == b and e.kind is EventKind.CALL_DISPATCHED]
        assert len(queued) == 1 and len(dispatched) == 1
        assert dispatched[0].time - queued[0].time >= 1  # the hold is queueing
        assert abs(dispatched[0].queue_wait_s - (dispatched[0].time - queued[0].time)) < 1e-9

    run(body, FakeEngine(kv_capacity=KV), kv_admission=True, kv_admission_fill=1.0)


def test_an_admitted_program_idle_past_the_timeout_stops_counting():
    async def body(s: Scheduler, engines):
        a, _, held = await fill_the_kv_and_hold_one(s)
        await asyncio.sleep(19)
        assert not held.done()  # a is idle, but maybe only for its tool
        await asyncio.sleep(15)  # past retention_timeout_s (30) after a's call
        assert held.done() and (await held)[-1].completion_tokens == 2
        assert a not in {p.id for p in s.admission.admitted}

    run(body, FakeEngine(kv_capacity=KV), kv_admission=True, kv_admission_fill=1.0)


def test_no_program_waits_longer_than_the_max_wait_behind_one_that_fills_the_kv():
    async def body(s: Scheduler, engines):
        a, _, held = await fill_the_kv_and_hold_one(s)
        busy = asyncio.ensure_future(consume(s.llm_call(a, req("a2", n=10_000))))  # 100 s
        await asyncio.sleep(58)  # a never idles, never ends
        assert not held.done()
        await asyncio.sleep(3)  # past kv_admission_max_wait_s (60) since b was held
        assert held.done() and (await held)[-1].completion_tokens == 2
        busy.cancel()

    run(body, FakeEngine(kv_capacity=KV, slots=2), kv_admission=True,
        kv_admission_fill=1.0)


def test_untagged_requests_and_later_calls_of_admitted_programs_pass_a_full_cache():
    async def body(s: Scheduler, engines):
        a = await s.open_program("a")
        await consume(s.llm_call(a, req("a1", n=4, text=text(996))))
        plain = await s.open_program(None)
        assert (await consume(s.llm_call(plain, req("plain", n=2))))[-1].completion_tokens == 2
        assert (await consume(s.llm_call(a, req("a2", n=2))))[-1].completion_tokens == 2
        assert s.admission.delayed == 0

    run(body, FakeEngine(kv_capacity=KV), kv_admission=True, kv_admission_fill=1.0)


def test_a_cancelled_held_call_leaves_nothing_behind():
    async def body(s: Scheduler, engines):
        a, _, held = await fill_the_kv_and_hold_one(s)
        held.cancel()  # the client went away
        await asyncio.sleep(0)
        assert s.queued() == 0 and not s.admission.held
        await s.end_program(a)
        await asyncio.sleep(1)
        assert "b1" not in engines[0].started

    run(body, FakeEngine(kv_capacity=KV), kv_admission=True, kv_admission_fill=1.0)


def test_ending_a_program_while_its_call_waits_for_admission_still_runs_the_call():
    async def body(s: Scheduler, engines):
        _, b, held = await fill_the_kv_and_hold_one(s)
        await s.end_program(b)  # calls in flight of an ended program finish
        assert (await held)[-1].completion_tokens == 2
        assert not s.admission.held and s.queued() == 0

    run(body, FakeEngine(kv_capacity=KV), kv_admission=True, kv_admission_fill=1.0)


def test_no_admission_when_a_replica_does_not_report_its_kv_or_by_default():
    async def body(s: Scheduler, engines):
        a = await s.open_program("a")
        await consume(s.llm_call(a, req("a1", n=4, text=text(5000))))
        b = await s.open_program("b")
        assert (await consume(s.llm_call(b, req("b1", n=2))))[-1].completion_tokens == 2
        assert s.admission.delayed == 0

    run(body, FakeEngine(kv_capacity=0), kv_admission=True)
    run(body, FakeEngine(kv_capacity=KV))  # off by default


def _call(program: Program, prompt: int, output: int, cached: int) -> CallNode:
    call = CallNode(id=f"c{prompt}", program=program, kind="llm", seq=0, created_at=0.0)
    call.prompt_tokens, call.completion_tokens, call.cached_tokens = prompt, output, cached
    return call


def test_footprint_is_the_longest_context_less_the_prefix_shared_with_other_programs():
    async def body() -> None:  # the admission arms timers on the running loop
        released: list[CallNode] = []
        admission = KvAdmission(SchedulerConfig(kv_admission=True, kv_admission_fill=1.0),
                                [SimpleNamespace(kv_capacity=KV)],
                                lambda call, now: released.append(call))
        tree = Program(id="tree", tenant="t", arrival=0.0, seq=0)
        first = _call(tree, 600, 20, cached=500)  # 500 tokens of shared system prompt
        assert admission.admit(first, 0.0)
        admission.on_call_finished(first, 0.0)
        assert admission.admitted[tree] == 120
        for prompt in (700, 650):  # two branches off the same trunk: the deeper one counts
            admission.on_call_finished(_call(tree, prompt, 30, cached=620), 1.0)
        assert admission.admitted[tree] == 730 - 500 and admission.demand == 230
        other = Program(id="other", tenant="t", arrival=0.0, seq=1)
        assert admission.admit(_call(other, 10, 0, 0), 2.0)  # 230 + a first-call estimate
        admission.on_call_finished(_call(other, 900, 10, cached=0), 2.0)  # now over the KV
        late = Program(id="late", tenant="t", arrival=0.0, seq=2)
        assert not admission.admit(_call(late, 10, 0, 0), 3.0) and not released
        admission.on_program_end(other, 4.0)
        assert [c.program.id for c in released] == ["late"]

    run_virtual(body())
