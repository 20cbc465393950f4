"""One program as the UI draws it: a list of calls with their DAG edges and timings.

Three sources, merged per call id, best first:
1. finished spans (from every replica, through the trace store): authoritative timings;
2. this instance's open calls (in flight now);
3. the local scheduler's program state: calls not yet started (pending on their
   inputs), and the DAG edges (`parents`) for calls whose spans lack them.
Times are wall-clock milliseconds since the epoch.
"""

from __future__ import annotations

import time
from typing import Any

from scheduler.views import CallState, ProgramState

from ..trace_store import SpanDict

A = "progserve."


def _event_ms(span: SpanDict, name: str) -> float | None:
    for event in span.get("events", ()):
        if event["name"] == name:
            return event["time_ns"] / 1e6
    return None


def call_from_span(span: SpanDict) -> dict[str, Any]:
    attrs = span.get("attributes", {})
    replica = attrs.get(A + "replica")
    status = span["status"]
    return {
        "id": span.get("call_id") or attrs.get(A + "call.id"),
        "kind": attrs.get(A + "call.kind", span.get("kind", "llm")),
        "tool": attrs.get(A + "tool.name"),
        "status": "finished"
        if status == "ok"
        else ("running" if status == "running" else "failed"),
        "parents": list(attrs.get(A + "call.parents", ())),
        "replica": None if replica is None or replica < 0 else replica,
        "instance": attrs.get(A + "instance"),
        "thread": attrs.get(A + "thread.id"),
        "queued_ms": span["start_ns"] / 1e6,
        "dispatched_ms": _event_ms(span, "dispatched"),
        "first_token_ms": _event_ms(span, "first_token"),
        "end_ms": span["end_ns"] / 1e6 if span.get("end_ns") else None,
        "queue_wait_s": attrs.get(A + "queue_wait_s"),
        "ttft_s": attrs.get(A + "ttft_s"),
        "prompt_tokens": attrs.get(A + "prompt_tokens", 0),
        "cached_tokens": attrs.get(A + "cached_tokens", 0),
        "decode_tokens": attrs.get(A + "decode_tokens", 0),
        "priority": attrs.get(A + "policy.priority", 0.0),
        "queue_level": attrs.get(A + "policy.queue_level", 0),
        "preemptions": attrs.get(A + "preemptions", 0),
        "partial_start_s": attrs.get(A + "tool.partial_start_s"),
        "error": span.get("error"),
    }


def call_from_state(call: CallState, to_wall_ms: Any) -> dict[str, Any]:
    return {
        "id": call.id,
        "kind": call.kind,
        "tool": call.tool,
        "status": call.status,
        "parents": list(call.parents),
        "replica": call.replica,
        "instance": None,
        "thread": call.thread_id,
        "queued_ms": to_wall_ms(call.queued_at),
        "dispatched_ms": to_wall_ms(call.dispatched_at),
        "first_token_ms": to_wall_ms(call.first_token_at),
        "end_ms": to_wall_ms(call.finished_at),
        "queue_wait_s": call.queue_wait_s,
        "ttft_s": (call.first_token_at - call.dispatched_at)
        if call.first_token_at and call.dispatched_at
        else None,
        "prompt_tokens": call.prompt_tokens,
        "cached_tokens": call.cached_tokens,
        "decode_tokens": call.completion_tokens,
        "priority": call.priority,
        "queue_level": call.queue_level,
        "preemptions": call.preemptions,
        "partial_start_s": None,
        "error": call.error,
    }


def loop_to_wall_ms(loop_now: float) -> Any:
    """A converter from scheduler loop time to wall-clock ms, anchored at `loop_now`."""
    wall_now_ms = time.time() * 1e3

    def convert(t: float | None) -> float | None:
        return None if not t else wall_now_ms - (loop_now - t) * 1e3

    return convert


def merge_calls(
    spans: list[SpanDict],
    open_spans: list[SpanDict],
    state: ProgramState | None,
    loop_now: float | None,
) -> list[dict[str, Any]]:
    calls: dict[str, dict[str, Any]] = {}
    for span in open_spans:
        call = call_from_span(span)
        calls[call["id"]] = call
    for span in spans:  # finished spans win over open ones (a call may end meanwhile)
        if span.get("kind") == "program" or not span.get("call_id"):
            continue
        call = call_from_span(span)
        previous = calls.get(call["id"])
        if (
            previous is None
            or previous["status"] == "running"
            or ((call["end_ms"] or 0) >= (previous["end_ms"] or 0))
        ):
            calls[call["id"]] = call
    if state is not None and loop_now is not None:
        convert = loop_to_wall_ms(loop_now)
        for call_state in state.calls:
            known = calls.get(call_state.id)
            if known is None:
                calls[call_state.id] = call_from_state(call_state, convert)
                continue
            if not known["parents"] and call_state.parents:
                known["parents"] = list(call_state.parents)
            if known["status"] == "running":  # spans carry tokens only once a call ends
                known["prompt_tokens"] = call_state.prompt_tokens
                known["cached_tokens"] = call_state.cached_tokens
                known["decode_tokens"] = call_state.completion_tokens
    return sorted(
        calls.values(), key=lambda c: (c["queued_ms"] is None, c["queued_ms"] or 0, c["id"])
    )
