"""Admission control: past its limits the server refuses new work with a clear 429 and a
`Retry-After`, instead of letting queues (and memory) grow without bound.

New work is a POST that starts LLM calls: `/generate`, `/v1/chat/completions`,
`/v1/completions`, `/v1/programs` and `/v1/programs/{id}/calls`. It is admitted while
- fewer than `limits.max_inflight_requests` such requests are being served (a stream
  counts until it ends), and
- fewer than `limits.max_queued_calls` calls wait in the scheduler's queue, and
- at least one engine replica is up (else 503: nothing could serve it).
Everything else (reads, variable waits, `end`, `cancel`, aborts, health, metrics) is always
admitted: it costs little and most of it frees capacity.

`Retry-After` is the time the queue needs to drain back under its limit at the measured
completion rate, clamped to `[retry_after_min_s, retry_after_max_s]`, so that clients
back off in proportion to the overload instead of hammering a full server.

The scheduler keeps its own hard caps (`scheduler.max_programs`, `max_queued_calls`,
`max_calls_per_program`); this layer answers before a request body is even read.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .config import LimitsConfig
from .errors import ApiError, OverloadedError

if TYPE_CHECKING:
    from scheduler.service import Scheduler

WORK_PATHS = re.compile(
    r"^/(generate|v1/chat/completions|v1/completions|v1/programs|v1/programs/[^/]+/calls)/?$"
)
RATE_WINDOW_S = 1.0  # completions are counted over windows of about this length


class NoReplicaError(ApiError):
    status_code = 503
    error_type = "service_unavailable_error"


class AdmissionController:
    """Decides whether a new-work request may start; counts the ones running."""

    def __init__(self, limits: LimitsConfig, scheduler: Scheduler) -> None:
        self.limits = limits
        self.scheduler = scheduler
        self.inflight = 0
        self.peak_inflight = 0
        self.admitted = 0
        self.rejected = 0
        self._rate = 0.0  # calls finished per second (smoothed)
        self._mark: tuple[float, int] | None = None  # (loop time, calls finished)

    def check(self) -> None:
        """Raise `OverloadedError` (429) or `NoReplicaError` (503) if the request must wait."""
        limits = self.limits
        if self.inflight >= limits.max_inflight_requests:
            self._reject()
            raise OverloadedError(
                f"{self.inflight} requests in progress (limit {limits.max_inflight_requests})"
                "; retry later", retry_after=self.retry_after(self.inflight
                                                              - limits.max_inflight_requests + 1))
        queued = self.scheduler.queued()
        if queued >= limits.max_queued_calls:
            self._reject()
            raise OverloadedError(
                f"{queued} calls are queued (limit {limits.max_queued_calls}); retry later",
                retry_after=self.retry_after(queued - limits.max_queued_calls + 1))
        if not self.scheduler.health.any_up():
            self._reject()
            raise NoReplicaError("no engine replica is up; retry later",
                                 code="no_healthy_replica")

    def _reject(self) -> None:
        self.rejected += 1

    def retry_after(self, excess: int) -> float:
        """Seconds for `excess` calls to finish at the measured rate, clamped."""
        rate = self._completion_rate()
        lo, hi = self.limits.retry_after_min_s, self.limits.retry_after_max_s
        if rate <= 0:
            return hi if excess > 0 else lo
        return min(hi, max(lo, math.ceil(excess / rate)))

    def _completion_rate(self) -> float:
        now = asyncio.get_running_loop().time()
        finished = self.scheduler.calls_finished
        if self._mark is None:
            self._mark = (now, finished)
            return self._rate
        then, before = self._mark
        elapsed = now - then
        if elapsed >= RATE_WINDOW_S:
            current = (finished - before) / elapsed
            self._rate = current if self._rate == 0 else 0.5 * self._rate + 0.5 * current
            self._mark = (now, finished)
        return self._rate


Render = Callable[[Request, BaseException], Response]


class AdmissionMiddleware:
    """Pure ASGI (no per-request task or body buffering): rejects before the body is read
    and keeps a stream counted until its last byte is sent."""

    def __init__(self, app: ASGIApp, controller: AdmissionController, render: Render) -> None:
        self.app = app
        self.controller = controller
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" \
                or not WORK_PATHS.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        controller = self.controller
        try:
            controller.check()
        except ApiError as exc:
            await self.render(Request(scope), exc)(scope, receive, send)
            return
        controller.inflight += 1
        controller.admitted += 1
        if controller.inflight > controller.peak_inflight:
            controller.peak_inflight = controller.inflight
        try:
            await self.app(scope, receive, send)
        finally:
            controller.inflight -= 1


def install_admission(app: Any, scheduler: Scheduler, limits: LimitsConfig,
                      render: Render) -> AdmissionController:
    """Add the middleware to a FastAPI app; the controller lands on `app.state.admission`."""
    controller = AdmissionController(limits, scheduler)
    app.add_middleware(AdmissionMiddleware, controller=controller, render=render)
    app.state.admission = controller
    return controller


__all__ = ["AdmissionController", "AdmissionMiddleware", "NoReplicaError", "install_admission"]
