"""Overload control (HTTP 429): past its limits the server refuses new work with a clear
429 and a `Retry-After`, instead of letting queues (and memory) grow without bound, and
one tenant's load never refuses another tenant's work. (Not KV admission, which holds
new programs back inside the scheduler: `scheduler/kv_admission.py`.)

New work is a POST that starts LLM calls: `/generate`, `/v1/chat/completions`,
`/v1/completions`, `/v1/programs` and `/v1/programs/{id}/calls`. Two limits, each shared
fairly between the tenants that use it:
- `limits.max_inflight_requests`: such requests being served at once (a stream counts
  until it ends), checked before the body is read;
- `limits.max_queued_calls`: open LLM calls (queued, running, or pending in a submitted
  graph), checked when the scheduler creates the calls, i.e. after the body is parsed and
  with every call the request brings counted (`scheduler/tenant_calls.py`).
A tenant's share of a limit is the limit divided by the tenants using it now (itself
included). Work that keeps the tenant within its share is admitted even when others
filled the server; work past its share is admitted only while the server as a whole is
within the limit. So a tenant alone may use everything, and a tenant that arrives while
another fills the server still gets its share: the other is refused until it is back
within its own. The total stays within twice the limit (one tenant filling it, the others
their shares as they arrive).

At least one engine replica must be up (else 503: nothing could serve it). Everything
else (reads, variable waits, `end`, `cancel`, aborts, health, metrics) is always
admitted: it costs little and most of it frees capacity.

What a refused tenant is told is about itself only (its own requests and calls; never
the server's queue or the other tenants), and `Retry-After` is the time its own excess
needs to drain at its own completion rate, clamped to `[retry_after_min_s,
retry_after_max_s]`. Admins see the server's load in `/get_server_info` and `/metrics`.

The scheduler keeps its own hard caps (`scheduler.max_programs`, `max_queued_calls`,
`max_calls_per_program`).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import SCOPE_CALLER, Authenticator
from .config import LimitsConfig
from .errors import ApiError, BadRequestError, OverloadedError

if TYPE_CHECKING:
    from scheduler.scheduler import Scheduler

WORK_PATHS = re.compile(
    r"^/(generate|v1/chat/completions|v1/completions|v1/programs|v1/programs/[^/]+/calls)/?$"
)
RATE_WINDOW_S = 1.0  # completions are counted over windows of about this length


class NoReplicaError(ApiError):
    status_code = 503
    error_type = "service_unavailable_error"


def within_share(own: int, total: int, tenants: int, more: int, limit: int) -> bool:
    """May a tenant holding `own` of `total` add `more`, with `tenants` tenants (itself
    included) sharing `limit`? Yes within its fair share, or while the whole stays within
    the limit; never past twice the limit."""
    if total + more > 2 * limit:
        return False
    return total + more <= limit or (own + more) * tenants <= limit


@dataclass(slots=True)
class _DrainRate:
    """A tenant's LLM calls finished per second, smoothed over windows."""

    mark_time: float
    mark_ended: int
    rate: float = 0.0

    def update(self, now: float, ended: int) -> float:
        elapsed = now - self.mark_time
        if elapsed >= RATE_WINDOW_S:
            current = (ended - self.mark_ended) / elapsed
            self.rate = current if self.rate == 0 else 0.5 * self.rate + 0.5 * current
            self.mark_time, self.mark_ended = now, ended
        return self.rate


class OverloadControl:
    """Decides whether new work may start; counts the requests running, per tenant."""

    def __init__(self, limits: LimitsConfig, scheduler: Scheduler, auth: Authenticator) -> None:
        self.limits = limits
        self.scheduler = scheduler
        self.auth = auth
        self.calls = scheduler.tenant_calls
        self.calls.check = self.admit_calls
        self.inflight = 0
        self.inflight_by_tenant: dict[str, int] = {}
        self.peak_inflight = 0
        self.admitted = 0
        self.rejected = 0
        self._rates: dict[str, _DrainRate] = {}

    # ------------------------------------------------------------------ the two limits

    def check_request(self, tenant: str) -> None:
        """Before the body: raise `OverloadedError` (429) past the tenant's share of the
        requests in progress, `NoReplicaError` (503) with no replica up."""
        own = self.inflight_by_tenant.get(tenant, 0)
        tenants = len(self.inflight_by_tenant) + (own == 0)
        limit = self.limits.max_inflight_requests
        if not within_share(own, self.inflight, tenants, 1, limit):
            self._reject()
            raise OverloadedError(
                f"your tenant has {own} requests in progress, its limit for now; retry later",
                retry_after=self.retry_after(tenant, own + 1 - limit // tenants))
        if not self.scheduler.health.any_up():
            self._reject()
            raise NoReplicaError("no engine replica is up; retry later",
                                 code="no_healthy_replica")

    def admit_calls(self, tenant: str, n: int) -> None:
        """When the scheduler is about to open `n` LLM calls for `tenant`: raise past the
        tenant's share of `limits.max_queued_calls` (429), or when one request brings
        more calls than the limit itself (400: it could never be admitted)."""
        limit = self.limits.max_queued_calls
        if n > limit:
            self._reject()
            raise BadRequestError(
                f"this request brings {n} LLM calls; at most {limit} may be open at once "
                "(limits.max_queued_calls): split it", code="too_many_calls")
        calls = self.calls
        own = calls.open.get(tenant, 0)
        tenants = len(calls.open) + (own == 0)
        if not within_share(own, calls.total, tenants, n, limit):
            self._reject()
            raise OverloadedError(
                f"your tenant has {own} LLM calls queued or running; this request brings {n} "
                "more, past its share of the queue; retry later",
                retry_after=self.retry_after(tenant, own + n - limit // tenants))

    def _reject(self) -> None:
        self.rejected += 1

    # ------------------------------------------------------------------ Retry-After

    def retry_after(self, tenant: str, excess: int) -> float:
        """Seconds for `excess` of the tenant's calls to finish at its rate, clamped."""
        rate = self._drain_rate(tenant)
        lo, hi = self.limits.retry_after_min_s, self.limits.retry_after_max_s
        if rate <= 0:
            return hi if excess > 0 else lo
        return min(hi, max(lo, math.ceil(max(excess, 1) / rate)))

    def _drain_rate(self, tenant: str) -> float:
        now = asyncio.get_running_loop().time()
        ended = self.calls.ended.get(tenant, 0)
        rate = self._rates.get(tenant)
        if rate is None:
            self._rates[tenant] = _DrainRate(now, ended)
            return 0.0
        return rate.update(now, ended)

    # ------------------------------------------------------------------ counting

    def started(self, tenant: str) -> None:
        self.inflight += 1
        self.inflight_by_tenant[tenant] = self.inflight_by_tenant.get(tenant, 0) + 1
        self.admitted += 1
        if self.inflight > self.peak_inflight:
            self.peak_inflight = self.inflight

    def finished(self, tenant: str) -> None:
        self.inflight -= 1
        left = self.inflight_by_tenant[tenant] - 1
        if left:
            self.inflight_by_tenant[tenant] = left
        else:
            del self.inflight_by_tenant[tenant]

    def load(self, tenant: str | None) -> dict[str, Any]:
        """What `tenant` may know of the load: its own figures; None (an admin): the
        server's."""
        if tenant is None:
            return {"requests_in_progress": self.inflight, "open_llm_calls": self.calls.total,
                    "tenants_with_open_calls": len(self.calls.open)}
        return {"tenant": tenant,
                "requests_in_progress": self.inflight_by_tenant.get(tenant, 0),
                "open_llm_calls": self.calls.open.get(tenant, 0)}


Render = Callable[[Request, BaseException], Response]


class OverloadMiddleware:
    """Pure ASGI (no per-request task or body buffering): rejects before the body is read
    and keeps a stream counted until its last byte is sent."""

    def __init__(self, app: ASGIApp, controller: OverloadControl, render: Render) -> None:
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
            caller = controller.auth.caller_for(Headers(scope=scope))
            scope[SCOPE_CALLER] = caller
            tenant = caller.tenant
            controller.check_request(tenant)
        except ApiError as exc:
            await self.render(Request(scope), exc)(scope, receive, send)
            return
        controller.started(tenant)
        try:
            await self.app(scope, receive, send)
        finally:
            controller.finished(tenant)


def install_overload_control(app: Any, scheduler: Scheduler, limits: LimitsConfig,
                      auth: Authenticator, render: Render) -> OverloadControl:
    """Add the middleware to a FastAPI app; the controller lands on `app.state.overload`
    and becomes the scheduler's admission check for new LLM calls."""
    controller = OverloadControl(limits, scheduler, auth)
    app.add_middleware(OverloadMiddleware, controller=controller, render=render)
    app.state.overload = controller
    return controller


__all__ = ["OverloadControl", "OverloadMiddleware", "NoReplicaError", "install_overload_control",
           "within_share"]
