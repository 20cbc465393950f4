"""Events that stand for others: a call whose first token comes with its final chunk (a
whole, non-streamed answer) gets no CALL_FIRST_TOKEN, its end event stands for it
(`SchedulerEvent.with_first_token`); a one-call (untagged) program's start and end ride on
its call's CALL_QUEUED and end event (`with_program_start`, `with_program_end`). Tracing
and metrics record what the separate events gave them. Real scheduler, deterministic
fake engine."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "scheduler"))

from sched_fake_engine import FakeEngine  # noqa: E402

from engine_backend.types import GenerateRequest, SamplingParams  # noqa: E402
from engine_backend.virtual_time import run_virtual  # noqa: E402
from progserve.metrics import Metrics  # noqa: E402
from progserve.trace_store import TraceStore  # noqa: E402
from progserve.tracing import Tracing  # noqa: E402
from scheduler.config import SchedulerConfig  # noqa: E402
from scheduler.events import EventKind, SchedulerEvent  # noqa: E402
from scheduler.scheduler import Scheduler  # noqa: E402


def _events_of_one_call(tokens: int, program_id: str | None = "p") -> list[SchedulerEvent]:
    async def main() -> list[SchedulerEvent]:
        sched = Scheduler([FakeEngine(prefill_s=0.02)], SchedulerConfig())
        await sched.start()
        events: list[SchedulerEvent] = []
        sched.add_listener(events.append)
        try:
            pid = await sched.open_program(program_id)
            request = GenerateRequest(rid="r", text="hello",
                                      sampling=SamplingParams(max_new_tokens=tokens))
            [c async for c in sched.llm_call(pid, request, call_id="c")]
            sched.list_programs()  # books the answered call (and ends a one-call program)
        finally:
            await sched.close()
        return events

    return run_virtual(main())


def _call_kinds(events: list[SchedulerEvent]) -> list[EventKind]:
    return [e.kind for e in events if e.call_id]


def test_a_whole_answer_ends_with_one_event_that_stands_for_its_first_token() -> None:
    events = _events_of_one_call(1)  # one chunk: the first token is the final chunk
    assert _call_kinds(events) == [EventKind.CALL_QUEUED, EventKind.CALL_DISPATCHED,
                                   EventKind.CALL_FINISHED]
    end = events[-1]
    assert end.with_first_token and end.ttft_s is not None and end.ttft_s > 0
    assert end.first_token_time() <= end.time
    streamed = _events_of_one_call(3)
    assert _call_kinds(streamed) == [EventKind.CALL_QUEUED, EventKind.CALL_DISPATCHED,
                                     EventKind.CALL_FIRST_TOKEN, EventKind.CALL_FINISHED]
    assert not streamed[-1].with_first_token


def _histogram_count(metrics: Metrics, name: str) -> float:
    metrics._fold()  # the tallies into the Prometheus objects, as a scrape does
    value = metrics.registry.get_sample_value(f"{name}_count")
    return value or 0.0


async def _first_token_events(events: list[SchedulerEvent]) -> list[str]:
    store = TraceStore("test")
    tracing = Tracing(store, instance_id="test")
    for ev in events:
        tracing.on_event(ev)
    (span,) = [s for s in await store.program_spans("p") if s["call_id"] == "c"]
    assert "progserve.ttft_s" in span["attributes"]
    return [e["name"] for e in span["events"]]


def test_listeners_record_the_first_token_of_a_whole_answer() -> None:
    for tokens in (1, 3):  # folded into the end event, and sent on its own
        events = _events_of_one_call(tokens)
        metrics = Metrics()
        for ev in events:
            metrics.on_event(ev)
        assert _histogram_count(metrics, "progserve_ttft_seconds") == 1
        assert _histogram_count(metrics, "progserve_time_per_output_token_seconds") == \
            (1 if tokens > 1 else 0)
        names = run_virtual(_first_token_events(events))
        assert names[:2] == ["dispatched", "first_token"], tokens


def test_a_one_call_program_starts_and_ends_with_its_call() -> None:
    events = _events_of_one_call(1, program_id=None)
    assert [e.kind for e in events] == [EventKind.CALL_QUEUED, EventKind.CALL_DISPATCHED,
                                        EventKind.CALL_FINISHED]
    queued, _, end = events
    assert queued.with_program_start and not queued.with_program_end
    assert end.with_program_end and end.with_first_token and end.status == "finished"
    named = _events_of_one_call(1)  # a named program: its own events, as before
    assert named[0].kind is EventKind.PROGRAM_STARTED
    assert not any(e.with_program_start or e.with_program_end for e in named)


def test_listeners_see_a_one_call_program_start_and_end() -> None:
    events = _events_of_one_call(3, program_id=None)
    program_id = events[0].program_id
    metrics = Metrics()
    for ev in events:
        metrics.on_event(ev)
    metrics._fold()
    registry = metrics.registry
    assert registry.get_sample_value("progserve_programs_started_total") == 1
    assert registry.get_sample_value("progserve_programs_ended_total",
                                     {"status": "finished"}) == 1
    assert _histogram_count(metrics, "progserve_program_token_latency_seconds") == 1

    async def spans() -> list[dict]:
        store = TraceStore("test")
        tracing = Tracing(store, instance_id="test")
        for ev in events:
            tracing.on_event(ev)
        assert store.record("default", program_id).status == "finished"
        return await store.program_spans(program_id)

    kinds = sorted(s["kind"] for s in run_virtual(spans()))
    assert kinds == ["llm", "program"]
