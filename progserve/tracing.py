"""OpenTelemetry traces: one trace per program, one span per LLM call and per tool call.

The scheduler reports call lifecycles as `SchedulerEvent`s (queued, dispatched, first
token, finished, ...). `Tracing.on_event` keeps a small timeline per open call and, when
the call ends, emits one span covering it: start = queued, with span events at dispatch
and first token, so queue wait, prefill (dispatch -> first token) and decode (first token
-> end) are all readable from the span. A program span closes the trace when the program
ends.

Identity across replicas, without coordination: a program's trace id and its root span
id are derived from the program id, so every progserve replica that serves one of its
calls files the span under the same trace. If a request carries a W3C `traceparent`, the
program's trace joins the caller's instead (its root span becomes a child of the
caller's span); with Redis, that binding is shared so that all replicas agree.

Where spans go:
- the in-memory ring (`TraceStore`), always on, feeds the UI;
- OpenTelemetry's console exporter, when `ObservabilityConfig.console_spans` is set;
- OpenTelemetry's OTLP/HTTP exporter, when `--otlp-endpoint` is given
  (`pip install progserve[otlp]`).
Both exporters run behind the SDK's `BatchSpanProcessor` (a background thread).

Why spans are built, not started: a call's span is known only when the call ends, and the
events that shape it arrive from the scheduler, not from code running inside the span. So
`Tracing` assembles each span once (a JSON-ready dict for the ring) and, only when an
exporter is configured, turns it into the SDK's `ReadableSpan` for the processors. This
skips the SDK's live-span machinery (locks, attribute re-validation), which cost several
times more per call than the scheduling itself; the ids, parentage, attributes and export
formats are OpenTelemetry's own. With no exporter (and no Redis mirror) the ring keeps the
span's builder and assembles it when it is first read: most spans never are.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from scheduler.events import EventKind, SchedulerEvent

from .call_timeline import CallTimeline, PackedCallSpan, Usage
from .trace_store import SpanDict, TraceStore, program_key

log = logging.getLogger(__name__)

A = "progserve."  # attribute namespace
PROGRAM_ID = A + "program.id"
# Attribute names, joined once (not per span).
_CACHED_TOKENS = A + "cached_tokens"
_CALL_ID = A + "call.id"
_CALL_KIND = A + "call.kind"
_CALL_PARENTS = A + "call.parents"
_DECODE_TOKENS = A + "decode_tokens"
_DURATION_S = A + "duration_s"
_INSTANCE = A + "instance"
_POLICY_PRIORITY = A + "policy.priority"
_POLICY_QUEUE_LEVEL = A + "policy.queue_level"
_PREEMPTIONS = A + "preemptions"
_PREFILL_TOKENS = A + "prefill_tokens"
_PROGRAM_CALLS = A + "program.calls"
_PROGRAM_STATUS = A + "program.status"
_PROMPT_TOKENS = A + "prompt_tokens"
_QUEUE_WAIT_S = A + "queue_wait_s"
_REPLICA = A + "replica"
_SERVICE = A + "service"
_SPAN_KIND = A + "span.kind"
_TENANT = A + "tenant"
_THREAD_ID = A + "thread.id"
_TOOL_NAME = A + "tool.name"
_TOOL_PARTIAL_START_S = A + "tool.partial_start_s"
_TTFT_S = A + "ttft_s"
SAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED)
MAX_OPEN_CALLS = 200_000  # in-flight call timelines kept (a guard, far above real loads)
MAX_BINDINGS = 100_000


# -- identity ---------------------------------------------------------------------------


def _digest_int(kind: str, key: str, nbytes: int) -> int:
    value = int.from_bytes(
        hashlib.sha256(f"progserve-{kind}:{key}".encode()).digest()[:nbytes], "big"
    )
    return value or 1  # all-zero ids are invalid in W3C trace context


def program_trace_id(key: str) -> int:
    """The trace id of a program, from its `program_key` (tenant and id)."""
    return _digest_int("trace", key, 16)


def program_root_span_id(key: str) -> int:
    return _digest_int("root", key, 8)


def format_traceparent(span_context: SpanContext) -> str:
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-01"


def parse_traceparent(
    value: str, propagator: TraceContextTextMapPropagator | None = None
) -> SpanContext | None:
    """The span context a W3C `traceparent` names, or None if it is malformed."""
    ctx = (propagator or TraceContextTextMapPropagator()).extract({"traceparent": value})
    span_context = trace.get_current_span(ctx).get_span_context()
    return span_context if span_context.is_valid else None


@dataclass(slots=True, frozen=True)
class ProgramTrace:
    """Where a program's spans go: its trace, its root span, and the caller's span above
    the root (from an incoming `traceparent`), if any."""

    trace_id: int
    root_span_id: int
    parent_span_id: int | None = None

    @classmethod
    def derived(cls, key: str) -> ProgramTrace:
        return cls(program_trace_id(key), program_root_span_id(key))

    @classmethod
    def under(cls, key: str, caller: SpanContext) -> ProgramTrace:
        return cls(caller.trace_id, program_root_span_id(key), caller.span_id)


# -- exporters --------------------------------------------------------------------------


def readable_span(span: SpanDict, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    """One of our span dicts as the SDK's `ReadableSpan`, for OpenTelemetry exporters."""
    trace_id = int(span["trace_id"], 16)
    context = SpanContext(trace_id, int(span["span_id"], 16), False, SAMPLED)
    parent = None
    if span["parent_id"] is not None:
        parent = SpanContext(trace_id, int(span["parent_id"], 16), False, SAMPLED)
    return ReadableSpan(
        name=span["name"],
        context=context,
        parent=parent,
        resource=resource,
        attributes=span["attributes"],
        events=[Event(e["name"], e["attributes"], e["time_ns"]) for e in span["events"]],
        kind=SpanKind.SERVER if span["kind"] == "program" else SpanKind.INTERNAL,
        status=Status(StatusCode.ERROR, span["error"])
        if span["status"] == "error"
        else Status(StatusCode.UNSET),
        start_time=span["start_ns"],
        end_time=span["end_ns"],
        instrumentation_scope=scope,
    )


def otlp_traces_url(endpoint: str) -> str:
    """`http://collector:4318` -> `http://collector:4318/v1/traces` (a full URL is kept)."""
    parts = urlsplit(endpoint)
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def otlp_exporter(endpoint: str) -> SpanExporter:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise RuntimeError(
            "--otlp-endpoint needs the OTLP exporter: pip install 'progserve[otlp]'"
        ) from exc
    return OTLPSpanExporter(endpoint=otlp_traces_url(endpoint), timeout=5)


# -- the scheduler listener -------------------------------------------------------------


class Tracing:
    """Tracing for one progserve runtime. Subscribe `on_event` to the scheduler."""

    def __init__(
        self,
        store: TraceStore,
        *,
        instance_id: str,
        console: bool = False,
        otlp_endpoint: str | None = None,
        service_name: str = "progserve",
    ):
        self.store = store
        self.instance_id = instance_id
        self.resource = Resource.create(
            {"service.name": service_name, "service.instance.id": instance_id}
        )
        self.scope = InstrumentationScope("progserve")
        self.processors: list[SpanProcessor] = []
        if console:
            self.processors.append(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stdout)))
        if otlp_endpoint:
            self.processors.append(BatchSpanProcessor(otlp_exporter(otlp_endpoint)))
        self._rng = random.Random()
        self.propagator = TraceContextTextMapPropagator()
        self._open: OrderedDict[tuple[str, str], CallTimeline] = OrderedDict()
        # Open timelines per program key: a program's end looks for its open calls only
        # when it has some (not by a scan of every open call of every program).
        self._open_per_program: dict[str, int] = {}
        self._bindings: OrderedDict[str, ProgramTrace] = OrderedDict()
        self._derived: OrderedDict[str, ProgramTrace] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._clock = _WallClock()

    async def start(self) -> None:
        await self.store.start()

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.store.close()
        for processor in self.processors:
            processor.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Push spans buffered for the exporters out now (True when all made it)."""
        self.store.catch_up()
        return all(p.force_flush(timeout_millis) for p in self.processors)

    def _emit(self, span: SpanDict) -> None:
        self.store.add_span(span)
        if self.processors:
            readable = readable_span(span, self.resource, self.scope)
            for processor in self.processors:
                processor.on_end(readable)

    # -- trace identity ------------------------------------------------------------------

    def adopt_caller(self, key: str, caller: SpanContext) -> None:
        """Hang a program's trace (by `program_key`) under a caller's span (from `traceparent`). The first
        binding wins, here and (with Redis) across replicas."""
        if key in self._bindings:
            return
        self._bind(key, ProgramTrace.under(key, caller))
        if self.store.shared:
            self._spawn(self._share_binding(key, format_traceparent(caller)))

    def program_trace(self, key: str) -> ProgramTrace:
        return self._bound_or_derived(key, self._bindings.get(key))

    def _derived_trace(self, key: str) -> ProgramTrace:
        derived = self._derived.get(key)
        if derived is None:  # two SHA-256s: cached, a program has many calls
            derived = self._derived[key] = ProgramTrace.derived(key)
            while len(self._derived) > MAX_BINDINGS:
                self._derived.popitem(last=False)
        return derived

    def _bind(self, key: str, binding: ProgramTrace) -> None:
        self._bindings[key] = binding
        while len(self._bindings) > MAX_BINDINGS:
            self._bindings.popitem(last=False)

    async def _share_binding(self, key: str, traceparent: str) -> None:
        agreed = await self.store.bind_trace_parent(key, traceparent)
        if agreed != traceparent:
            self._bind_from_traceparent(key, agreed)

    async def _adopt_shared_binding(self, key: str) -> None:
        found = await self.store.lookup_trace_parent(key)
        if found and key not in self._bindings:
            self._bind_from_traceparent(key, found)

    def _bind_from_traceparent(self, key: str, traceparent: str) -> None:
        caller = parse_traceparent(traceparent, self.propagator)
        if caller is not None:
            self._bind(key, ProgramTrace.under(key, caller))

    def _adopt_current_context(self, key: str) -> None:
        """The scheduler calls listeners synchronously, inside the request that submitted
        the call: a `traceparent` the middleware attached is the current context here."""
        if key in self._bindings:
            return
        current = otel_context.get_current()
        if not current and not self.store.shared:
            return  # no caller span here (the common case), nothing shared to look up
        caller = trace.get_current_span(current).get_span_context()
        if caller.is_valid and caller.is_remote:
            self.adopt_caller(key, caller)
        elif self.store.shared:
            self._spawn(self._adopt_shared_binding(key))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- events --------------------------------------------------------------------------

    def on_event(self, ev: SchedulerEvent) -> None:
        handler = self._HANDLERS.get(ev.kind)
        if handler is not None:
            handler(self, ev, self._clock.wall_ns(ev.time))

    def _program_started(self, ev: SchedulerEvent, now_ns: int) -> None:
        rec = self.store.record(ev.tenant, ev.program_id)
        if not rec.started_ns:
            rec.started_ns = now_ns
        self.store.touch(rec)
        self._adopt_current_context(rec.key)

    def _program_ended(self, ev: SchedulerEvent, now_ns: int) -> None:
        rec = self.store.record(ev.tenant, ev.program_id)
        rec.status = ev.status if ev.status in ("finished", "failed", "cancelled") else "finished"
        rec.ended_ns = now_ns
        rec.started_ns = rec.started_ns or now_ns
        key = rec.key  # a property that builds the key: once here
        if self._open_per_program.get(key):
            for open_key in [k for k in self._open if k[0] == key]:
                left_open = self._pop_open(open_key)
                if left_open is not None:
                    self._finish_call(left_open, now_ns, error=f"program {rec.status} first",
                                      rec=rec)
        self._emit_program_span(ev, rec.started_ns, now_ns, rec, key)
        self.store.touch(rec)
        self._bindings.pop(key, None)
        self._derived.pop(key, None)

    def _call_queued(self, ev: SchedulerEvent, now_ns: int) -> None:
        if ev.with_program_start:  # a one-call program starts with its call
            self._program_started(ev, now_ns)
        timeline = self._open.get(_open_key(ev))
        if timeline is None:
            self._open_call(ev, now_ns, ev.call_kind or "llm")
        else:  # re-queued after a preemption
            timeline.events.append(("requeued", now_ns, None))

    def _call_dispatched(self, ev: SchedulerEvent, now_ns: int) -> None:
        timeline = self._timeline(ev, now_ns)
        timeline.replica = ev.replica
        timeline.priority = ev.priority
        timeline.queue_level = ev.queue_level
        if ev.queue_wait_s is not None:
            timeline.queue_wait_s = ev.queue_wait_s
        timeline.events.append(("dispatched", now_ns, {_REPLICA: _replica(ev.replica)}))

    def _call_first_token(self, ev: SchedulerEvent, now_ns: int) -> None:
        timeline = self._timeline(ev, now_ns)
        if timeline.first_event("first_token") is None:
            timeline.ttft_s = ev.ttft_s
            timeline.events.append(("first_token", now_ns, None))

    def _call_preempted(self, ev: SchedulerEvent, now_ns: int) -> None:
        timeline = self._timeline(ev, now_ns)
        timeline.preemptions += 1
        timeline.events.append(("preempted", now_ns, {_REPLICA: _replica(ev.replica)}))

    def _call_promoted(self, ev: SchedulerEvent, now_ns: int) -> None:
        timeline = self._open.get(_open_key(ev))
        if timeline is not None:
            timeline.events.append(("promoted", now_ns, {_POLICY_QUEUE_LEVEL: 0}))

    def _tool_started(self, ev: SchedulerEvent, now_ns: int) -> None:
        timeline = self._timeline(ev, now_ns, kind="tool")
        timeline.tool = ev.tool or timeline.tool
        if ev.partial_start_s is not None:
            timeline.partial_start_s = ev.partial_start_s
        timeline.events.append(("dispatched", now_ns, None))

    def _call_ended(self, ev: SchedulerEvent, now_ns: int) -> None:
        timeline = self._pop_open(_open_key(ev))
        if timeline is None:  # ended before we saw it start (e.g. failed validation late)
            timeline = self._new_timeline(ev, now_ns, ev.call_kind or "llm")
            rec = self._count_call(timeline)
        else:
            rec = self.store.record(ev.tenant, ev.program_id)
        failed = ev.kind in (EventKind.CALL_FAILED, EventKind.TOOL_FAILED)
        if ev.replica is not None:
            timeline.replica = ev.replica
        if ev.partial_start_s is not None:
            timeline.partial_start_s = ev.partial_start_s
        if ev.with_first_token and timeline.first_event("first_token") is None:
            timeline.ttft_s = ev.ttft_s  # what CALL_FIRST_TOKEN would have recorded
            timeline.events.append(
                ("first_token", self._clock.wall_ns(ev.first_token_time()), None))
        self._finish_call(
            timeline, now_ns, error=(ev.error or "failed") if failed else None, rec=rec, ev=ev
        )
        self.store.touch(rec)
        if ev.with_program_end:  # a one-call program ends with its call
            self._program_ended(ev, now_ns)

    _HANDLERS: Mapping[EventKind, Any] = {
        EventKind.PROGRAM_STARTED: _program_started,
        EventKind.PROGRAM_ENDED: _program_ended,
        EventKind.CALL_QUEUED: _call_queued,
        EventKind.CALL_DISPATCHED: _call_dispatched,
        EventKind.CALL_FIRST_TOKEN: _call_first_token,
        EventKind.CALL_PREEMPTED: _call_preempted,
        EventKind.CALL_PROMOTED: _call_promoted,
        EventKind.CALL_FINISHED: _call_ended,
        EventKind.CALL_FAILED: _call_ended,
        EventKind.TOOL_STARTED: _tool_started,
        EventKind.TOOL_FINISHED: _call_ended,
        EventKind.TOOL_FAILED: _call_ended,
    }

    # -- timelines -----------------------------------------------------------------------

    def _timeline(self, ev: SchedulerEvent, now_ns: int, kind: str | None = None) -> CallTimeline:
        timeline = self._open.get(_open_key(ev))
        if timeline is None:
            timeline = self._open_call(ev, now_ns, kind or ev.call_kind or "llm")
        return timeline

    def _new_timeline(self, ev: SchedulerEvent, now_ns: int, kind: str) -> CallTimeline:
        return CallTimeline(
            key=program_key(ev.tenant, ev.program_id),
            program_id=ev.program_id,
            call_id=ev.call_id or "",
            kind=kind,
            tenant=ev.tenant,
            queued_ns=now_ns,
            thread_id=ev.thread_id,
            tool=ev.tool,
            parents=ev.parents,
            priority=ev.priority,
            queue_level=ev.queue_level,
        )

    def _open_call(self, ev: SchedulerEvent, now_ns: int, kind: str) -> CallTimeline:
        timeline = self._new_timeline(ev, now_ns, kind)
        key = timeline.key
        self._open[(key, timeline.call_id)] = timeline
        self._open_per_program[key] = self._open_per_program.get(key, 0) + 1
        while len(self._open) > MAX_OPEN_CALLS:
            self._pop_open(next(iter(self._open)))
        rec = self._count_call(timeline)
        rec.inflight += 1
        self.store.touch(rec)
        self._adopt_current_context(timeline.key)
        return timeline

    def _pop_open(self, open_key: tuple[str, str]) -> CallTimeline | None:
        timeline = self._open.pop(open_key, None)
        if timeline is not None:
            key = open_key[0]
            left = self._open_per_program[key] - 1
            if left:
                self._open_per_program[key] = left
            else:
                del self._open_per_program[key]
        return timeline

    def _count_call(self, timeline: CallTimeline) -> Any:
        rec = self.store.record(timeline.tenant, timeline.program_id)
        rec.started_ns = rec.started_ns or timeline.queued_ns
        if timeline.kind == "tool":
            rec.tool_calls += 1
        else:
            rec.llm_calls += 1
        return rec

    def _finish_call(
        self,
        timeline: CallTimeline,
        end_ns: int,
        *,
        error: str | None,
        rec: Any,
        ev: SchedulerEvent | None = None,
    ) -> None:
        rec.inflight = max(0, rec.inflight - 1)
        if error is not None:
            rec.failed_calls += 1
        if ev is not None:
            rec.prompt_tokens += ev.prompt_tokens
            rec.completion_tokens += ev.completion_tokens
            rec.cached_tokens += ev.cached_tokens
        key = timeline.key
        self._keep_span(key, PackedCallSpan(self._call_span, timeline, end_ns, error,
                                            None if ev is None else _usage_of(ev),
                                            self._bindings.get(key),
                                            self._rng.getrandbits(64) or 1))

    def _emit_program_span(self, ev: SchedulerEvent, start_ns: int, end_ns: int, rec: Any,
                           key: str) -> None:
        # Its figures, not its event: the span may be kept unbuilt for a long time.
        self._keep_span(key, partial(
            self._program_span, ev.program_id, ev.tenant, ev.error, start_ns, end_ns, key,
            rec.status, rec.llm_calls + rec.tool_calls, self._bindings.get(key)))

    def _keep_span(self, key: str, build: Callable[[], SpanDict]) -> None:
        """A finished span: built now for the exporters, else when something reads it
        (`TraceStore.add_deferred_span`). Everything it shows is fixed here: the timeline
        and the event are done with, the program's figures and trace binding are passed
        as they are now (a program without a binding has its derived trace, the same
        whenever it is computed)."""
        if self.processors:
            self._emit(build())
        else:
            self.store.add_deferred_span(key, build)

    def _bound_or_derived(self, key: str, binding: ProgramTrace | None) -> ProgramTrace:
        return binding if binding is not None else self._derived_trace(key)

    def _call_span(self, timeline: CallTimeline, end_ns: int, error: str | None,
                   usage: Usage | None, binding: ProgramTrace | None,
                   span_id: int) -> SpanDict:
        binding = self._bound_or_derived(timeline.key, binding)
        attrs = _call_attributes(timeline, self.instance_id)
        if usage is not None:
            attrs.update(_usage_attributes(usage))
        return {
            "trace_id": f"{binding.trace_id:032x}",
            "span_id": f"{span_id:016x}",
            "parent_id": f"{binding.root_span_id:016x}",
            "name": _span_name(timeline),
            "kind": timeline.kind,
            "program_id": timeline.program_id,
            "program_key": timeline.key,
            "tenant": timeline.tenant,
            "call_id": timeline.call_id,
            "start_ns": timeline.queued_ns,
            "end_ns": max(end_ns, timeline.queued_ns),
            "status": "ok" if error is None else "error",
            "error": None if error is None else error[:500],
            "attributes": attrs,
            "events": _events(timeline),
        }

    def _program_span(self, program_id: str, tenant: str, error: str | None, start_ns: int,
                      end_ns: int, key: str, status: str, calls: int,
                      binding: ProgramTrace | None) -> SpanDict:
        binding = self._bound_or_derived(key, binding)
        failed = status != "finished"
        return {
            "trace_id": f"{binding.trace_id:032x}",
            "span_id": f"{binding.root_span_id:016x}",
            "parent_id": None
            if binding.parent_span_id is None
            else f"{binding.parent_span_id:016x}",
            "name": f"program {program_id}",
            "kind": "program",
            "program_id": program_id,
            "program_key": key,
            "tenant": tenant,
            "call_id": None,
            "start_ns": start_ns,
            "end_ns": max(end_ns, start_ns),
            "status": "error" if failed else "ok",
            "error": (error or status) if failed else None,
            "attributes": {
                PROGRAM_ID: program_id,
                _SPAN_KIND: "program",
                _TENANT: tenant,
                _INSTANCE: self.instance_id,
                _PROGRAM_STATUS: status,
                _PROGRAM_CALLS: calls,
            },
            "events": [],
        }

    # -- reads for the UI ----------------------------------------------------------------

    def open_calls(self, key: str) -> list[SpanDict]:
        """This instance's in-flight calls of a program, shaped like finished spans
        (`end_ns` None, status "running")."""
        self.store.catch_up()
        binding = self.program_trace(key)
        out = []
        for (open_key, _), timeline in self._open.items():
            if open_key != key:
                continue
            out.append(
                {
                    "trace_id": f"{binding.trace_id:032x}",
                    "span_id": f"open-{timeline.call_id}",
                    "parent_id": f"{binding.root_span_id:016x}",
                    "name": _span_name(timeline),
                    "kind": timeline.kind,
                    "program_id": timeline.program_id,
                    "program_key": key,
                    "tenant": timeline.tenant,
                    "call_id": timeline.call_id,
                    "start_ns": timeline.queued_ns,
                    "end_ns": None,
                    "status": "running",
                    "error": None,
                    "attributes": _call_attributes(timeline, self.instance_id),
                    "events": _events(timeline),
                }
            )
        return out


# -- helpers ----------------------------------------------------------------------------


class _WallClock:
    """Wall-clock ns of a loop-time instant (the scheduler stamps events with loop time):
    now on the wall clock, less how long ago it was on the loop's.

    A call's half-dozen events carry loop times, which advance once per loop turn, so
    both clocks are read again only for an event later than the last reading; the
    others are placed against that reading (the same instants, up to the wall clock's
    drift against the loop's since)."""

    __slots__ = ("_loop_s", "_wall_ns")

    def __init__(self) -> None:
        self._loop_s = -1.0
        self._wall_ns = 0

    def wall_ns(self, loop_time: float) -> int:
        if loop_time > self._loop_s:
            try:
                self._loop_s = asyncio.get_running_loop().time()
            except RuntimeError:
                return time.time_ns()
            self._wall_ns = time.time_ns()
        return self._wall_ns - int(max(0.0, self._loop_s - loop_time) * 1e9)


def _open_key(ev: SchedulerEvent) -> tuple[str, str]:
    return (program_key(ev.tenant, ev.program_id), ev.call_id or "")


def _span_name(t: CallTimeline) -> str:
    return f"tool {t.tool or t.call_id}" if t.kind == "tool" else f"llm {t.call_id}"


def _events(t: CallTimeline) -> list[dict[str, Any]]:
    return [{"name": n, "time_ns": ts, "attributes": a if a is not None else {}}
            for n, ts, a in t.events]


def _replica(replica: int | None) -> int:
    return -1 if replica is None else replica


def _call_attributes(t: CallTimeline, instance_id: str) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        PROGRAM_ID: t.program_id,
        _SPAN_KIND: t.kind,
        _CALL_ID: t.call_id,
        _CALL_KIND: t.kind,
        _TENANT: t.tenant,
        _INSTANCE: instance_id,
        _POLICY_PRIORITY: float(t.priority),
        _POLICY_QUEUE_LEVEL: int(t.queue_level),
        _REPLICA: _replica(t.replica),
        _PREEMPTIONS: t.preemptions,
    }
    if t.thread_id is not None:
        attrs[_THREAD_ID] = t.thread_id
    if t.parents:
        attrs[_CALL_PARENTS] = list(t.parents)
    if t.queue_wait_s is not None:
        attrs[_QUEUE_WAIT_S] = float(t.queue_wait_s)
    if t.ttft_s is not None:
        attrs[_TTFT_S] = float(t.ttft_s)
    if t.tool is not None:
        attrs[_TOOL_NAME] = t.tool
    if t.partial_start_s is not None:
        attrs[_TOOL_PARTIAL_START_S] = float(t.partial_start_s)
    return attrs


def _usage_of(ev: SchedulerEvent) -> Usage:
    return (ev.prompt_tokens, ev.cached_tokens, ev.completion_tokens, ev.service,
            ev.queue_wait_s, ev.ttft_s, ev.duration_s, ev.replica)


def _usage_attributes(usage: Usage) -> dict[str, Any]:
    prompt, cached, completion, service, queue_wait_s, ttft_s, duration_s, replica = usage
    attrs: dict[str, Any] = {
        _PROMPT_TOKENS: prompt,
        _PREFILL_TOKENS: max(0, prompt - cached),
        _CACHED_TOKENS: cached,
        _DECODE_TOKENS: completion,
        _SERVICE: float(service),
        # OpenTelemetry's GenAI semantic conventions, for tools that know them.
        "gen_ai.usage.input_tokens": prompt,
        "gen_ai.usage.output_tokens": completion,
    }
    if queue_wait_s is not None:
        attrs[_QUEUE_WAIT_S] = float(queue_wait_s)
    if ttft_s is not None:
        attrs[_TTFT_S] = float(ttft_s)
    if duration_s is not None:
        attrs[_DURATION_S] = float(duration_s)
    if replica is not None:
        attrs[_REPLICA] = replica
    return attrs


class TraceContextMiddleware:
    """ASGI middleware: a request's W3C `traceparent` becomes the current OpenTelemetry
    context while it is handled. The scheduler calls listeners inside the request that
    opens a program or queues a call, so the program joins the caller's trace there (with
    its tenant known, which this middleware, running before auth, does not know).
    Requests without the header pass straight through."""

    def __init__(self, app: Any, tracing: Tracing):
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        traceparent = None
        for name, value in scope.get("headers", ()):
            if name == b"traceparent":
                traceparent = value.decode("latin-1")
                break
        caller = parse_traceparent(traceparent, self.tracing.propagator) if traceparent else None
        if caller is None:
            await self.app(scope, receive, send)
            return
        token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(caller)))
        try:
            await self.app(scope, receive, send)
        finally:
            otel_context.detach(token)


def install_tracing(app: Any, tracing: Tracing) -> None:
    """Add the `traceparent` middleware to a FastAPI app (before it starts)."""
    app.add_middleware(TraceContextMiddleware, tracing=tracing)
