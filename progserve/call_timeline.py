"""A call as tracing observes it (`CallTimeline`), and the packed form its finished span
is kept in until something reads it (`PackedCallSpan`).

Why packed: the trace store keeps the newest `trace_max_spans` spans (10,000), most never
read, so they are kept unbuilt. Kept as the timeline, its events and figures, a span was
about 1.4 KB in some 15 small objects (ints of wall-clock nanoseconds, floats, tuples,
a dict per dispatch), and under `bench load` those pinned the allocator's arenas: the
server's RSS grew by what the spans weighed on every round (docs/reliability.md,
"Memory"). Packed: its numbers in one `bytes`, its strings shared, about 0.5 KB.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# A call's figures as its span shows them: (prompt, cached, completion tokens, service,
# queue wait, ttft, duration, replica). A kept span holds these, not its whole event.
Usage = tuple[int, int, int, float, float | None, float | None, float | None, int | None]
# (name, wall ns, attributes or None): a kept span's events carry no empty dict each
TimelineEvent = tuple[str, int, dict[str, Any] | None]


@dataclass(slots=True)
class CallTimeline:
    """An open call, as observed so far (wall-clock ns)."""

    key: str  # program_key(tenant, program id)
    program_id: str
    call_id: str
    kind: str  # "llm" | "tool"
    tenant: str
    queued_ns: int
    thread_id: str | None = None
    tool: str | None = None
    parents: tuple[str, ...] = ()
    replica: int | None = None
    priority: float = 0.0
    queue_level: int = 0
    queue_wait_s: float | None = None
    ttft_s: float | None = None
    partial_start_s: float | None = None
    preemptions: int = 0
    events: list[TimelineEvent] = field(default_factory=list)

    def first_event(self, name: str) -> int | None:
        return next((ts for n, ts, _ in self.events if n == name), None)


# queued_ns, end_ns, span id, replica, priority, queue level, queue wait, ttft, partial
# start, preemptions; then the usage: prompt, cached, completion tokens, service, queue
# wait, ttft, duration, replica; whether there was a usage.
_FIGURES = struct.Struct("<qqQqdqdddq qqqddddq ?".replace(" ", ""))
_EVENT = struct.Struct("<qq")  # wall ns, the value of its one attribute (or 0)
_NONE_INT = -(2**63)  # an int field's None
SpanBuild = Callable[[CallTimeline, int, "str | None", "Usage | None", Any, int], Any]


class PackedCallSpan:
    """A finished call's span, unbuilt: `span()` builds it with `build`, the tracer's own
    builder, from the timeline unpacked."""

    __slots__ = ("build", "key", "program_id", "call_id", "kind", "tenant", "thread_id",
                 "tool", "parents", "error", "binding", "numbers", "event_keys")

    def __init__(self, build: SpanBuild, timeline: CallTimeline, end_ns: int,
                 error: str | None, usage: Usage | None, binding: Any, span_id: int) -> None:
        self.build = build
        self.key = timeline.key
        self.program_id = timeline.program_id
        self.call_id = timeline.call_id
        self.kind = timeline.kind
        self.tenant = timeline.tenant
        self.thread_id = timeline.thread_id
        self.tool = timeline.tool
        self.parents = timeline.parents
        self.error = error
        self.binding = binding
        keys, event_numbers = _pack_events(timeline.events)
        self.event_keys = keys
        self.numbers = _pack_figures(timeline, end_ns, usage, span_id) + event_numbers

    def __call__(self) -> Any:
        figures = _FIGURES.unpack_from(self.numbers)
        timeline = CallTimeline(
            key=self.key, program_id=self.program_id, call_id=self.call_id, kind=self.kind,
            tenant=self.tenant, queued_ns=figures[0], thread_id=self.thread_id,
            tool=self.tool, parents=self.parents, replica=_int(figures[3]),
            priority=figures[4], queue_level=figures[5], queue_wait_s=_float(figures[6]),
            ttft_s=_float(figures[7]), partial_start_s=_float(figures[8]),
            preemptions=figures[9], events=self._events(),
        )
        usage = None
        if figures[18]:
            usage = (figures[10], figures[11], figures[12], figures[13], _float(figures[14]),
                     _float(figures[15]), _float(figures[16]), _int(figures[17]))
        return self.build(timeline, figures[1], self.error, usage, self.binding, figures[2])

    def _events(self) -> list[TimelineEvent]:
        keys = self.event_keys
        if isinstance(keys, list):  # events that did not fit the packed shape, as they were
            return keys
        events: list[TimelineEvent] = []
        numbers = _EVENT.iter_unpack(memoryview(self.numbers)[_FIGURES.size:])
        pairs = zip(keys[::2], keys[1::2], strict=True)
        for (name, attribute), (ns, value) in zip(pairs, numbers, strict=True):
            events.append((name, ns, None if attribute is None else {attribute: value}))
        return events


def _pack_figures(t: CallTimeline, end_ns: int, usage: Usage | None, span_id: int) -> bytes:
    if usage is None:
        usage_figures: tuple[Any, ...] = (0, 0, 0, 0.0, math.nan, math.nan, math.nan,
                                          _NONE_INT, False)
    else:
        prompt, cached, completion, service, wait, ttft, duration, replica = usage
        usage_figures = (prompt, cached, completion, service, _nan(wait), _nan(ttft),
                         _nan(duration), _NONE_INT if replica is None else replica, True)
    return _FIGURES.pack(
        t.queued_ns, end_ns, span_id, _NONE_INT if t.replica is None else t.replica,
        t.priority, t.queue_level, _nan(t.queue_wait_s), _nan(t.ttft_s),
        _nan(t.partial_start_s), t.preemptions, *usage_figures)


def _pack_events(events: list[TimelineEvent]) -> tuple[tuple[str | None, ...] | list[Any],
                                                        bytes]:
    """(name, attribute key) pairs and (ns, value) numbers; a timeline whose events carry
    anything but at most one int attribute each is kept as it is."""
    keys: list[str | None] = []
    parts: list[bytes] = []
    for name, ns, attributes in events:
        if attributes is None:
            keys += (name, None)
            parts.append(_EVENT.pack(ns, 0))
            continue
        if len(attributes) != 1:
            return list(events), b""
        ((attribute, value),) = attributes.items()
        if type(value) is not int:
            return list(events), b""
        keys += (name, attribute)
        parts.append(_EVENT.pack(ns, value))
    return tuple(keys), b"".join(parts)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _float(value: float) -> float | None:
    return None if math.isnan(value) else value


def _int(value: int) -> int | None:
    return None if value == _NONE_INT else value
