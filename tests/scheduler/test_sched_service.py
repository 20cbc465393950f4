"""The Scheduler service end to end, on a minimal deterministic engine in virtual time."""

from __future__ import annotations

import asyncio

import pytest
from sched_fake_engine import FakeEngine

from engine_backend.types import GenerateRequest, SamplingParams
from engine_backend.virtual_time import run_virtual
from scheduler.config import SchedulerConfig
from scheduler.errors import (
    CallFailedError,
    ProgramCancelledError,
    ProgramNotFoundError,
    ProgramValidationError,
)
from scheduler.events import EventKind
from scheduler.program import CallStatus
from scheduler.scheduler import Scheduler
from scheduler.spec import CallSpec, ProgramSpec


def req(rid: str, n: int = 4, text: str = "hello world") -> GenerateRequest:
    return GenerateRequest(rid=rid, text=text, sampling=SamplingParams(max_new_tokens=n))


def gen(cid: str, prompt: str, output: str, n: int = 3, **kw) -> CallSpec:
    return CallSpec(id=cid, prompt=prompt, output=output,
                    sampling=SamplingParams(max_new_tokens=n), **kw)


def run(coro_fn, *engines, **config):
    async def main():
        engs = list(engines) or [FakeEngine()]
        sched = Scheduler(engs, SchedulerConfig(**config), tools=config.pop("_tools", None))
        await sched.start()
        try:
            return await coro_fn(sched, engs)
        finally:
            await sched.close()

    return run_virtual(main())


async def consume(stream) -> list:
    return [chunk async for chunk in stream]


def test_proxy_call_streams_and_records_history():
    async def body(s: Scheduler, engines):
        pid = await s.open_program("p1")
        chunks = await consume(s.llm_call(pid, req("r1", n=5)))
        assert "".join(c.text for c in chunks) == "xxxxx"
        final = chunks[-1]
        assert final.finish_reason is not None and final.completion_tokens == 5
        state = s.program_state(pid)
        assert state.status == "idle"
        (c,) = state.calls
        assert c.status == "finished" and c.completion_tokens == 5 and c.replica == 0
        assert state.history.calls_finished == 1
        assert state.history.service == pytest.approx(5 * 0.012 + 11 * 1e-4)
        assert state.history.engines_used == [0]
        # the engine got the program id and a priority
        assert engines[0].requests[0].program_id == "p1"

    run(body)


def test_single_call_program_ends_by_itself():
    async def body(s: Scheduler, engines):
        pid = await s.open_program(None)
        await consume(s.llm_call(pid, req("r")))
        assert s.program_state(pid).status == "finished"
        # no retention hint will ever name it: engines get no cache owner to track
        assert engines[0].requests[-1].program_id is None

    run(body)


def test_graph_program_follows_dataflow_and_fills_variables():
    async def body(s: Scheduler, engines):
        spec = ProgramSpec(
            inputs={"q": "why?"},
            calls=[
                gen("join", "{{a}} + {{b}}", "answer", n=2),
                gen("first", "Q: {{q}}", "a", n=3),
                gen("second", "Again {{q}}", "b", n=4),
            ],
        )
        pid = await s.submit_program(spec)
        assert await s.wait_variable(pid, "answer", timeout=60) == "xx"
        state = s.program_state(pid)
        assert state.variables == {"q": "why?", "a": "xxx", "b": "xxxx", "answer": "xx"}
        calls = {c.id: c for c in state.calls}
        assert set(calls["join"].parents) == {"first", "second"}
        assert calls["join"].dispatched_at >= max(calls["first"].finished_at,
                                                  calls["second"].finished_at)
        # the join's prompt was rendered from the produced values
        texts = [r.text for r in engines[0].requests]
        assert "xxx + xxxx" in texts
        assert s.programs.get(pid, "default").graph.has_edge("first", "join")

    run(body)


def test_stream_variable_yields_deltas():
    async def body(s: Scheduler, engines):
        pid = await s.submit_program(ProgramSpec(calls=[gen("g", "hi", "out", n=3)]))
        deltas = [d async for d in s.stream_variable(pid, "out")]
        assert "".join(deltas) == "xxx"

    run(body)


def test_dynamic_growth_with_add_calls():
    async def body(s: Scheduler, engines):
        pid = await s.submit_program(ProgramSpec(calls=[gen("a", "hi", "x", n=2)]))
        await s.wait_variable(pid, "x", timeout=10)
        await s.add_calls(pid, [gen("b", "{{x}} more", "y", n=1)])
        assert await s.wait_variable(pid, "y", timeout=10) == "x"

    run(body)


@pytest.mark.parametrize(
    ("calls", "message"),
    [
        ([gen("a", "{{b_out}}", "a_out"), gen("b", "{{a_out}}", "b_out")], "cycle"),
        ([gen("a", "{{nope}}", "a_out")], "unknown variable 'nope'"),
        ([gen("a", "x", "o1"), gen("a", "y", "o2")], "duplicate call id 'a'"),
        ([gen("a", "x", "o", parents=["ghost"])], "unknown parent 'ghost'"),
        ([gen("a", "x", "o"), gen("b", "y", "o")], "variable 'o' is written by both"),
        ([CallSpec(id="t", kind="tool", tool="search", output="r")], "no tool executor"),
    ],
)
def test_validation_errors_name_the_culprit(calls, message):
    async def body(s: Scheduler, engines):
        with pytest.raises(ProgramValidationError, match=message):
            await s.submit_program(ProgramSpec(calls=calls))

    run(body)


def test_graph_size_limit():
    async def body(s: Scheduler, engines):
        calls = [gen(f"c{i}", "x", f"o{i}") for i in range(6)]
        with pytest.raises(ProgramValidationError, match="limit is 5"):
            await s.submit_program(ProgramSpec(calls=calls))

    run(body, max_calls_per_program=5)


def test_tenants_only_see_their_own_programs():
    async def body(s: Scheduler, engines):
        pid = await s.open_program("shared-name", tenant="alice")
        with pytest.raises(ProgramNotFoundError):
            s.program_state(pid, tenant="bob")
        with pytest.raises(ProgramNotFoundError):
            s.llm_call(pid, req("r"), tenant="bob")
        with pytest.raises(ProgramNotFoundError):
            await s.cancel_program(pid, tenant="bob")
        # bob's own program with the same id is a different program
        await s.open_program("shared-name", tenant="bob")
        assert [p.tenant for p in s.list_programs(tenant="alice")] == ["alice"]
        assert len(s.list_programs()) == 2

    run(body)


def test_scheduler_order_decides_under_a_small_budget():
    """Budget of one request: PLAS serves the fresh program before the heavy one, even
    though the heavy one's call was queued first; FCFS does the opposite."""

    async def scenario(s: Scheduler, engines):
        heavy = await s.open_program("heavy")
        await consume(s.llm_call(heavy, req("h0", n=200)))  # heavy attains service
        blocker = await s.open_program("blocker")
        light = await s.open_program("light")
        tasks = [asyncio.create_task(consume(s.llm_call(blocker, req("b0", n=50))))]
        await asyncio.sleep(0.01)  # blocker occupies the only slot
        tasks.append(asyncio.create_task(consume(s.llm_call(heavy, req("h1", n=5)))))
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(consume(s.llm_call(light, req("l1", n=5)))))
        await asyncio.gather(*tasks)
        return engines[0].started

    plas = run(scenario, FakeEngine(slots=4), policy="plas", max_inflight_requests=1)
    fcfs = run(scenario, FakeEngine(slots=4), policy="fcfs", max_inflight_requests=1)
    assert plas[-2:] == ["l1", "h1"]
    assert fcfs[-2:] == ["h1", "l1"]


def test_long_program_finishes_under_a_flood_of_short_ones():
    """Anti-starvation end to end: a long program keeps making progress while short
    programs keep arriving faster than the engine can serve them."""

    async def body(s: Scheduler, engines):
        long_id = await s.open_program("long")
        done = asyncio.Event()

        async def long_program():
            for i in range(6):
                await consume(s.llm_call(long_id, req(f"L{i}", n=30)))
            done.set()

        async def flood():
            i = 0
            while not done.is_set() and i < 2000:
                pid = await s.open_program(f"short{i}")
                asyncio.create_task(consume(s.llm_call(pid, req(f"s{i}", n=3))))
                i += 1
                await asyncio.sleep(0.02)  # 150% of capacity (3 tokens * 0.01 s each)
            return i

        long_task = asyncio.create_task(long_program())
        flooded = await flood()
        await asyncio.wait_for(long_task, timeout=100)
        assert done.is_set()
        assert flooded < 2000  # finished while the flood was still going
        assert (await s.stats()).promotions > 0

    run(body, FakeEngine(slots=1), policy="plas", max_inflight_requests=1, starvation_beta=2.0)


def test_client_disconnect_aborts_and_frees_the_call():
    async def body(s: Scheduler, engines):
        pid = await s.open_program("p")
        stream = s.llm_call(pid, req("r", n=100))
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break
        await stream.aclose()
        await asyncio.sleep(0.05)
        state = s.program_state(pid)
        assert state.calls[0].status == "cancelled"
        assert s.replicas[0].inflight_requests == 0
        assert len(engines[0].started) == 1
        # the engine's generator was closed: its slot is free again
        await consume(s.llm_call(pid, req("r2", n=2)))

    run(body)


def test_closing_a_stream_mid_call_closes_the_engine_stream_at_once():
    """No loop turn, no garbage collection: the engine's request is let go inside
    `aclose()`, as the call's slot."""
    async def body(s: Scheduler, engines):
        pid = await s.open_program("p")
        stream = s.llm_call(pid, req("r", n=100))
        for _ in range(3):
            await stream.__anext__()
        assert "r" in engines[0]._live
        await stream.aclose()
        assert "r" not in engines[0]._live  # the engine generator's `finally` ran
        assert s.replicas[0].inflight_requests == 0

    run(body)


def test_cancel_program_cancels_queued_and_running_calls():
    async def body(s: Scheduler, engines):
        spec = ProgramSpec(calls=[gen("a", "x", "a_out", n=500), gen("b", "{{a_out}}", "b_out"),
                                  gen("c", "y", "c_out", n=500)])
        pid = await s.submit_program(spec)
        await asyncio.sleep(0.5)
        await s.cancel_program(pid)
        with pytest.raises(ProgramCancelledError):
            await s.wait_variable(pid, "b_out", timeout=5)
        await asyncio.sleep(0.5)
        state = s.program_state(pid)
        assert state.status == "cancelled"
        assert {c.status for c in state.calls} == {"cancelled"}
        assert s.replicas[0].inflight_requests == 0
        with pytest.raises(ProgramCancelledError):
            s.llm_call(pid, req("late"))

    run(body, FakeEngine(slots=1), max_inflight_requests=1)


def test_failed_call_fails_its_dependants_with_a_named_error():
    async def body(s: Scheduler, engines):
        engines[0].fail_rids.add("boom")
        pid = await s.open_program("p")
        with pytest.raises(CallFailedError, match="call 'c1'"):
            await consume(s.llm_call(pid, req("boom"), call_id="c1"))
        spec = ProgramSpec(calls=[gen("a", "x", "a_out"), gen("b", "{{a_out}}", "b_out")])
        # make the graph call fail: its rid is generated, so fail by prefix
        orig = engines[0].generate

        def failing(request):
            if request.text == "x":
                engines[0].fail_rids.add(request.rid)
            return orig(request)

        engines[0].generate = failing
        gid = await s.submit_program(spec)
        with pytest.raises(CallFailedError, match="variable 'a_out'") as info:
            await s.wait_variable(gid, "b_out", timeout=5)
        assert info.value.call_id == "a"
        state = s.program_state(gid)
        assert {c.id: c.status for c in state.calls} == {"a": "failed", "b": "failed"}
        assert state.error

    run(body)


def test_retention_pins_between_calls_and_lets_go_at_end_or_idle():
    async def body(s: Scheduler, engines):
        eng = engines[0]
        pid = await s.open_program("agent")
        await consume(s.llm_call(pid, req("c1")))
        await asyncio.sleep(0)  # the hint is sent by a task
        assert eng.retained == {"agent": True}  # idle (a tool runs): pinned
        stream = s.llm_call(pid, req("c1b", n=20))
        await stream.__anext__()
        await asyncio.sleep(0)
        assert eng.retained == {"agent": True}  # active again: the slot is kept
        async for _ in stream:
            pass
        await asyncio.sleep(0)
        assert eng.retained == {"agent": True}
        await s.end_program(pid)
        await asyncio.sleep(0)
        assert eng.retained == {} and eng.ended == ["agent"]  # ended: unpinned, let go
        idle = await s.open_program("idle")
        await consume(s.llm_call(idle, req("c2")))
        await asyncio.sleep(0)
        assert eng.retained["idle"] is True
        await asyncio.sleep(29)
        assert eng.retained["idle"] is True
        await asyncio.sleep(2)  # past retention_timeout_s = 30
        assert eng.retained["idle"] is False

    run(body, retention_budget_fraction=1.0)


def test_an_ended_program_is_let_go_where_it_ran_also_after_a_late_call():
    async def body(s: Scheduler, engines):
        eng = engines[0]
        pid = await s.open_program("agent")
        await consume(s.llm_call(pid, req("c1")))
        plain = await s.open_program(None)  # an untagged request: no hint
        single = await consume(s.llm_call(plain, req("plain")))
        assert single[-1].finish_reason is not None
        stream = s.llm_call(pid, req("c2", n=20))
        await stream.__anext__()
        await s.end_program(pid)  # c2 still runs
        await asyncio.sleep(0)
        assert eng.ended == ["agent"] and eng.retained == {}  # no pins by default
        async for _ in stream:  # c2 finishes after the end: its KV is let go too
            pass
        await asyncio.sleep(0)
        assert eng.ended == ["agent", "agent"]

    run(body)


def test_retention_pins_only_as_many_programs_as_its_budget_covers():
    async def body(s: Scheduler, engines):
        eng = engines[0]  # 20 tokens of KV (all of it for pins): one 15-token context fits
        a, b = await s.open_program("a"), await s.open_program("b")
        await consume(s.llm_call(a, req("a1", n=4)))  # 11 prompt + 4 output tokens
        await consume(s.llm_call(b, req("b1", n=4)))
        await asyncio.sleep(0)
        assert eng.retained == {"a": True}  # b found the budget full
        assert s.retention.refused == 1
        await s.end_program(a)  # a's slot passes on at b's next idle time
        await consume(s.llm_call(b, req("b2", n=4)))
        await asyncio.sleep(0)
        assert eng.retained == {"b": True} and eng.ended == ["a"]

    run(body, FakeEngine(kv_capacity=20), retention_budget_fraction=1.0)


def test_a_latency_critical_call_and_its_inputs_run_before_other_ready_calls():
    async def body(s: Scheduler, engines):
        eng = engines[0]  # one request in flight: the queue order is the order of starts
        blocker = await s.open_program("blocker")
        running = asyncio.ensure_future(consume(s.llm_call(blocker, req("busy", n=30))))
        await asyncio.sleep(0.05)
        spec = ProgramSpec(calls=[
            gen("bulk1", "x", "b1"), gen("bulk2", "y", "b2"), gen("plan", "z", "plan"),
            gen("answer", "{{plan}}", "ans", latency_critical=True),
        ])
        gid = await s.submit_program(spec)
        await s.wait_variable(gid, "ans", timeout=10)
        await running
        started = [rid.split("/")[1] for rid in eng.started[1:]]
        assert started[:2] == ["plan", "answer"], started

    run(body, FakeEngine(slots=1), policy="plas", max_inflight_requests=1)


def test_tool_calls_run_through_the_tool_runner():
    class Tools:
        def __init__(self):
            self.calls = []

        async def run(self, name, args, *, program_id, call_id):
            self.calls.append((name, args, program_id, call_id))
            await asyncio.sleep(1.0)
            if name == "explode":
                raise RuntimeError("tool blew up")
            return {"echo": args["q"]}

    async def main():
        tools = Tools()
        s = Scheduler([FakeEngine()], SchedulerConfig(), tools=tools)
        await s.start()
        spec = ProgramSpec(calls=[
            gen("think", "plan", "plan", n=2),
            CallSpec(id="search", kind="tool", tool="search", args={"q": "{{plan}}!"},
                     output="found"),
            gen("answer", "{{found}}", "answer", n=1),
        ])
        pid = await s.submit_program(spec)
        assert await s.wait_variable(pid, "answer", timeout=30) == "x"
        assert await s.wait_variable(pid, "found") == '{"echo": "xx!"}'
        assert tools.calls == [("search", {"q": "xx!"}, pid, "search")]
        bad = await s.submit_program(ProgramSpec(calls=[
            CallSpec(id="t", kind="tool", tool="explode", args={"q": "1"}, output="o"),
            gen("after", "{{o}}", "after"),
        ]))
        with pytest.raises(CallFailedError, match="tool blew up"):
            await s.wait_variable(bad, "after", timeout=30)
        await s.close()

    run_virtual(main())


def test_listener_sees_call_lifecycle():
    async def body(s: Scheduler, engines):
        events = []
        s.add_listener(events.append)
        pid = await s.open_program("p")
        await consume(s.llm_call(pid, req("r", n=3), thread_id="t1"))
        kinds = [e.kind for e in events if e.call_id]
        assert kinds == [EventKind.CALL_QUEUED, EventKind.CALL_DISPATCHED,
                         EventKind.CALL_FIRST_TOKEN, EventKind.CALL_FINISHED]
        fin = events[-1]
        assert fin.thread_id == "t1" and fin.replica == 0 and fin.completion_tokens == 3
        assert fin.ttft_s is not None and fin.duration_s == pytest.approx(0.03)

    run(body)


def test_stats_report_queues_and_replicas():
    async def body(s: Scheduler, engines):
        pids = [await s.open_program(f"p{i}") for i in range(5)]
        tasks = [asyncio.create_task(consume(s.llm_call(p, req(f"r{p}", n=10)))) for p in pids]
        await asyncio.sleep(0.001)
        st = await s.stats()
        assert st.running == 2 and st.queued == 3
        assert [r.inflight_requests for r in st.replicas] == [1, 1]
        await asyncio.gather(*tasks)
        st = await s.stats()
        assert st.calls_finished == 5 and st.queued == 0

    run(body, FakeEngine(), FakeEngine(), max_inflight_requests=1, balance="least_loaded")


def test_idle_program_ends_by_itself_and_reopens_with_its_history():
    async def body(s: Scheduler, engines):
        pid = await s.open_program("chatty")
        await consume(s.llm_call(pid, req("c1")))
        await asyncio.sleep(50)
        assert s.program_state(pid).status == "idle"
        await consume(s.llm_call(pid, req("c2")))  # activity moves the deadline
        await asyncio.sleep(90)
        assert s.program_state(pid).status == "idle"
        await asyncio.sleep(20)  # 110 s idle > 100 s
        state = s.program_state(pid)
        assert state.status == "finished"
        await consume(s.llm_call(pid, req("c3")))
        state = s.program_state(pid)
        assert state.status == "idle" and state.history.calls_finished == 3

    run(body, program_idle_timeout_s=100)


def test_answer_first_then_the_scheduler_books_the_call_by_itself():
    """A proxy writes its answer while the call's bookkeeping waits: the final chunk comes
    first, with the replica slot already free; once the consumer lets go of the stream,
    the scheduler books the call in the next loop turn."""
    async def body(s: Scheduler, engines):
        pid = await s.open_program("p1")
        stream = s.llm_call(pid, req("r1", n=3))
        async for chunk in stream:
            if chunk.finish_reason is not None:
                break
        (call,) = s.programs.get(pid, "default").calls.values()
        assert call.status == CallStatus.RUNNING  # answered, not yet booked
        assert s.replicas[0].inflight_requests == 0  # its slot is free already
        await stream.aclose()
        assert call.status == CallStatus.RUNNING  # closing does not book it in its place
        await asyncio.sleep(0)
        assert call.status == CallStatus.FINISHED
        state = s.program_state(pid)
        assert state.calls[0].completion_tokens == 3 and state.history.calls_finished == 1

    run(body)


def test_a_stream_dropped_after_its_answer_is_booked_too():
    async def body(s: Scheduler, engines):
        pid = await s.open_program("p1")
        stream = s.llm_call(pid, req("r1", n=3))
        async for chunk in stream:
            if chunk.finish_reason is not None:
                break
        (call,) = s.programs.get(pid, "default").calls.values()
        del stream, chunk  # the asyncio loop's finalizer closes the generator
        for _ in range(3):
            await asyncio.sleep(0)
        assert call.status == CallStatus.FINISHED

    run(body)


def test_a_look_at_the_program_books_its_answered_calls_first():
    async def body(s: Scheduler, engines):
        pid = await s.open_program("p1")
        stream = s.llm_call(pid, req("r1", n=3))
        async for chunk in stream:
            if chunk.finish_reason is not None:
                break
        state = s.program_state(pid)
        assert state.calls[0].status == "finished" and state.history.calls_finished == 1
        await stream.aclose()

    run(body)


def test_programs_past_the_kept_ones_are_freed_without_the_cycle_collector():
    import gc

    from scheduler.program import Program

    def live_programs() -> int:
        return sum(1 for o in gc.get_objects() if type(o) is Program)

    async def body(s: Scheduler, engines):
        before = live_programs()
        for i in range(30):
            pid = await s.open_program(None)
            await consume(s.llm_call(pid, req(f"r{i}")))
        return live_programs() - before

    gc.collect()
    gc.disable()
    try:
        alive = run(body, keep_finished_programs=5)
    finally:
        gc.enable()
    assert alive <= 5 + 1  # the kept ones (and the one just ended)
