"""Liveness and readiness: `/health` (and SGLang's `/health_generate`). No API key needed,
so load balancers can probe. 200 while at least one replica is healthy and the scheduler
moves; 503 when no replica is healthy, or when calls have waited `stall_timeout_s` while
no call was dispatched or ended (a wedged scheduler: restarting it is the remedy). The body
says "degraded" while a replica is down or a store serves on local state (`stores`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..errors import ErrorInfo, problem_body
from .common import json_response, runtime_of

router = APIRouter(tags=["health"])


@router.get("/health")
@router.get("/health_generate")
async def health(request: Request) -> Response:
    runtime = runtime_of(request)
    healthy = await runtime.health()
    replicas = [{"replica": i, "healthy": ok} for i, ok in enumerate(healthy)]
    if not any(healthy):
        return _unavailable("no engine replica is healthy", "no_healthy_replica",
                            {"replicas": replicas})
    stalled_s = runtime.scheduler.stalled_for()
    limit = runtime.settings.stall_timeout_s
    if stalled_s >= limit:
        return _unavailable(f"calls have waited {stalled_s:.0f} s while no call was dispatched "
                            f"or ended (limit {limit:g} s)", "scheduler_stalled",
                            {"replicas": replicas, "stalled_s": round(stalled_s, 3)})
    # A store serving on local state (Redis away) degrades the service; it is not down.
    stores = {"history": runtime.store.health(),
              "traces": request.app.state.observability.store.health()}
    ok = all(healthy) and all(store.status == "ok" for store in stores.values())
    return json_response({"status": "ok" if ok else "degraded", "engine": runtime.settings.engine,
                          "model": runtime.model_name, "replicas": replicas,
                          "stores": {name: s.to_json() for name, s in stores.items()}})


def _unavailable(detail: str, code: str, extras: dict[str, Any]) -> Response:
    info = ErrorInfo(503, "service_unavailable_error", detail, code=code)
    return json_response({**problem_body(info), **extras}, status=503,
                         media_type="application/problem+json")
