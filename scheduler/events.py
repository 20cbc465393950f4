"""Lifecycle events of calls and programs, for tracing and metrics.

Listeners are plain callables run synchronously in the scheduler's loop: they must be
cheap and must not raise (a raising listener is logged and skipped). Events are built only
when at least one listener wants their kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class EventKind(StrEnum):
    PROGRAM_STARTED = "program_started"
    PROGRAM_ENDED = "program_ended"
    CALL_QUEUED = "call_queued"
    CALL_DISPATCHED = "call_dispatched"
    CALL_FIRST_TOKEN = "call_first_token"
    CALL_FINISHED = "call_finished"
    CALL_FAILED = "call_failed"
    CALL_PREEMPTED = "call_preempted"
    CALL_PROMOTED = "call_promoted"
    TOOL_STARTED = "tool_started"
    TOOL_FINISHED = "tool_finished"
    TOOL_FAILED = "tool_failed"


@dataclass(slots=True)
class SchedulerEvent:
    kind: EventKind
    time: float  # loop time
    program_id: str
    tenant: str
    call_id: str | None = None
    thread_id: str | None = None
    call_kind: str | None = None  # "llm" | "tool"
    tool: str | None = None
    priority: float = 0.0
    queue_level: int = 0
    replica: int | None = None
    queue_wait_s: float | None = None
    ttft_s: float | None = None
    duration_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    service: float = 0.0
    status: str | None = None  # program status on PROGRAM_ENDED
    error: str | None = None
    parents: tuple[str, ...] = ()  # calls this one depends on (the DAG edges), for tracing
    # Partial tool execution: how long before its arguments were complete the tool started
    # (seconds; None for tools that got their whole input at once).
    partial_start_s: float | None = None


Listener = Callable[[SchedulerEvent], None]
