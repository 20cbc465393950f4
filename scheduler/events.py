"""Lifecycle events of calls and programs, for tracing and metrics.

Listeners are plain callables run synchronously in the scheduler's loop: they must be
cheap and must not raise (a raising listener is logged and skipped). Events are built only
when at least one listener wants their kind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from .program import PROGRAM_STATUS_NAMES, CallNode, Program

log = logging.getLogger(__name__)


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
    # On a call's end event (CALL_FINISHED, CALL_FAILED): its first token came, and no
    # CALL_FIRST_TOKEN was sent for it (the token came with the final chunk, as a whole
    # non-streamed answer does): the end event stands for both, one event fewer per call.
    with_first_token: bool = False
    # A one-call program's start and end ride on its call's events: CALL_QUEUED with
    # `with_program_start` stands for PROGRAM_STARTED too, and an end event with
    # `with_program_end` for PROGRAM_ENDED (its `status` is then the program's, "finished").
    with_program_start: bool = False
    with_program_end: bool = False

    def first_token_time(self) -> float:
        """Loop time of the call's first token, read from its end event (`time` less
        what the call ran after it); the end's own time when it did not run."""
        if self.duration_s is None or self.ttft_s is None:
            return self.time
        return self.time - max(0.0, self.duration_s - self.ttft_s)


_END_KINDS = frozenset((EventKind.CALL_FINISHED, EventKind.CALL_FAILED))

Listener = Callable[[SchedulerEvent], None]


class Clock(Protocol):
    def time(self) -> float: ...


class EventBus:
    """The scheduler's listeners and the events it sends them.

    `wanted` is every kind some listener takes: the scheduler checks it before it builds
    an event (`if EventKind.X in bus.wanted: bus.call_event(...)`), so an event nobody
    wants costs one set lookup."""

    __slots__ = ("wanted", "_listeners", "_clock")

    def __init__(self, clock: Clock) -> None:
        self.wanted: frozenset[EventKind] = frozenset()
        self._listeners: list[tuple[Listener, frozenset[EventKind] | None]] = []
        self._clock = clock  # read at each event: the loop may be bound later

    def add(self, listener: Listener, kinds: Iterable[EventKind] | None = None) -> None:
        self._listeners.append((listener, None if kinds is None else frozenset(kinds)))
        self._refresh_wanted()

    def remove(self, listener: Listener) -> None:
        self._listeners = [(f, k) for f, k in self._listeners if f is not listener]
        self._refresh_wanted()

    def _refresh_wanted(self) -> None:
        wanted: set[EventKind] = set()
        for _, kinds in self._listeners:
            wanted |= set(EventKind) if kinds is None else kinds
        self.wanted = frozenset(wanted)

    def emit(self, event: SchedulerEvent) -> None:
        for listener, kinds in self._listeners:
            if kinds is not None and event.kind not in kinds:
                continue
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a listener never breaks scheduling
                log.exception("scheduler listener failed")

    def call_event(
        self,
        kind: EventKind,
        call: CallNode,
        *,
        queue_wait_s: float | None = None,
        error: str | None = None,
        program_end: bool = False,
    ) -> None:
        """`program_end`: the event stands for its one-call program's end too."""
        program = call.program
        program_start = kind is EventKind.CALL_QUEUED and not program.start_sent
        if program_start:
            program.start_sent = True
        dispatched = call.dispatched_at
        ttft = call.first_token_at - dispatched if call.first_token_at >= 0 else None
        duration = call.finished_at - dispatched if call.finished_at >= 0 <= dispatched else None
        spec = call.spec
        # Positional, in `SchedulerEvent`'s field order: several per call, and keywords
        # cost a name match each.
        self.emit(
            SchedulerEvent(
                kind, self._clock.time(), program.id, program.tenant,
                call.id,  # call_id
                call.thread_id,
                call.kind,  # call_kind
                spec.tool if spec is not None else None,  # tool
                call.priority,
                call.level,  # queue_level
                call.replica if call.replica >= 0 else None,  # replica
                queue_wait_s if queue_wait_s is not None else call.wait,  # queue_wait_s
                ttft,  # ttft_s
                duration,  # duration_s
                call.prompt_tokens, call.completion_tokens, call.cached_tokens,
                call.service,
                "finished" if program_end else None,  # status: the program's, if it ends
                error,
                call.parents,
                None,  # partial_start_s
                # with_first_token
                kind in _END_KINDS and call.first_token_at >= 0 and not call.first_token_sent,
                program_start,  # with_program_start
                program_end,  # with_program_end
            )
        )

    def program_event(self, kind: EventKind, program: Program) -> None:
        # Positional, as in `call_event`: two per one-call program.
        self.emit(
            SchedulerEvent(
                kind, self._clock.time(), program.id, program.tenant,
                None, None, None, None,  # call_id, thread_id, call_kind, tool
                0.0, 0, None,  # priority, queue_level, replica
                None, None, None,  # queue_wait_s, ttft_s, duration_s
                0, 0, 0,  # prompt, completion and cached tokens
                program.history.service,
                PROGRAM_STATUS_NAMES[program.status],  # status
                program.error,
            )
        )
