"""Liveness and readiness: `/health` (and SGLang's `/health_generate`). No API key needed,
so load balancers can probe. 200 while at least one replica is healthy, else 503; the body
says "degraded" while a replica is down or a store serves on local state (`stores`)."""

from __future__ import annotations

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
        info = ErrorInfo(503, "service_unavailable_error", "no engine replica is healthy",
                         code="no_healthy_replica")
        return json_response({**problem_body(info), "replicas": replicas}, status=503,
                             media_type="application/problem+json")
    # A store serving on local state (Redis away) degrades the service; it is not down.
    stores = {"history": runtime.store.health(),
              "traces": request.app.state.observability.store.health()}
    ok = all(healthy) and all(store.status == "ok" for store in stores.values())
    return json_response({"status": "ok" if ok else "degraded", "engine": runtime.settings.engine,
                          "model": runtime.model_name, "replicas": replicas,
                          "stores": {name: s.to_json() for name, s in stores.items()}})
