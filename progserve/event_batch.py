"""Scheduler events for the observability listeners, applied off the request path.

Tracing and metrics do real work per event (span assembly and JSON, histogram and counter
updates): about a third of the proxy's CPU per call. The scheduler calls its listeners
synchronously, inside the request that queues or finishes a call, so that work sat on
every call's latency. `EventBatch` is the one listener the scheduler calls: it appends the
event, with the caller's OpenTelemetry context (tracing reads a `traceparent` from it), and
applies the pending events to the real listeners, in order, each listener in turn as the
scheduler would have:
- soon after a call is dispatched (`call_soon`): the batch runs once the request has gone
  to its engine, in the time the call waits for the engine anyway;
- at the latest `max_delay_s` after an event (an idle server still gets its spans);
- at once past `max_pending` events (a burst);
- before anything reads what the listeners built: trace-store reads, `/metrics`, `/ui`,
  an exporter flush, shutdown (`flush()`, wired by `observability.build_observability`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from opentelemetry import context as otel_context

from scheduler.events import EventKind, SchedulerEvent

log = logging.getLogger(__name__)

Listener = Callable[[SchedulerEvent], None]


class EventBatch:
    def __init__(self, listeners: Sequence[Listener], *, max_delay_s: float = 0.05,
                 max_pending: int = 4096) -> None:
        self._listeners = tuple(listeners)
        self._max_delay_s = max_delay_s
        self._max_pending = max_pending
        self._pending: list[tuple[SchedulerEvent, otel_context.Context]] = []
        self._soon = False
        self._timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def on_event(self, ev: SchedulerEvent) -> None:
        """The scheduler's listener: cheap, never raises."""
        pending = self._pending
        pending.append((ev, otel_context.get_current()))
        if self._soon:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop to defer to
            self.flush()
            return
        if ev.kind is EventKind.CALL_DISPATCHED or len(pending) >= self._max_pending:
            self._soon = True
            loop.call_soon(self._flush_soon)
        elif self._timer is None:
            self._timer = loop.call_later(self._max_delay_s, self._flush_late)

    def _flush_soon(self) -> None:
        self._soon = False
        self.flush()

    def _flush_late(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Apply every pending event now."""
        while self._pending:
            batch, self._pending = self._pending, []
            for ev, ctx in batch:
                # An empty context is the common case: no attach/detach for it.
                token = otel_context.attach(ctx) if ctx else None
                try:
                    for listener in self._listeners:
                        try:
                            listener(ev)
                        except Exception:  # noqa: BLE001 - a listener never breaks the rest
                            log.exception("observability listener failed on %s", ev.kind)
                finally:
                    if token is not None:
                        otel_context.detach(token)

    def close(self) -> None:
        """Apply what is pending and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
