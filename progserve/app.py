"""The FastAPI app: routers, the one error mapping, the runtime's lifespan.

`create_app(runtime)` builds an app around a `ServerRuntime` (tests inject engines), or around
a new one built from `Settings`. The runtime starts and stops with the app's lifespan.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from engine_backend.errors import EngineError
from scheduler.errors import CallFailedError, SchedulerError

from .api import health, openai, programs, sglang
from .api.common import BODY_DEFS_KEY, ClientGone, json_response
from .api.schema_facts import add_server_facts, allowed_methods
from .config import Settings
from .errors import ApiError, ErrorInfo, classify, openai_body, problem_body
from .gc_tuning import ServerCollector
from .observability import install_observability
from .overload import install_overload_control
from .runtime import ServerRuntime

log = logging.getLogger(__name__)

# Routes whose errors are RFC 9457 problem JSON; every other route answers OpenAI's shape
# (which SGLang's `{"error": {"message"}}` clients read too).
PROBLEM_PREFIXES = ("/v1/programs", "/health")


def error_response(request: Request, exc: BaseException) -> Response:
    if isinstance(exc, StarletteHTTPException) and exc.status_code == 405:
        allow = allowed_methods(request.app.openapi(), request.url.path)  # RFC 9110: all
        if allow:
            exc.headers = {**(exc.headers or {}), "Allow": allow}
    if request.url.path.startswith(PROBLEM_PREFIXES):
        info = classify(exc)
        return json_response(problem_body(info, _problem_extras(exc)), status=info.status,
                             headers=info.headers, media_type="application/problem+json")
    info = _proxy_info(exc)
    return json_response(openai_body(info), status=info.status, headers=info.headers)


def _proxy_info(exc: BaseException) -> ErrorInfo:
    # A proxied call that failed through the client's fault reports the cause itself.
    if isinstance(exc, CallFailedError) and isinstance(exc.cause, BaseException) \
            and 400 <= exc.status_code < 500:
        return classify(exc.cause)
    return classify(exc)


def _problem_extras(exc: BaseException) -> dict[str, Any]:
    """RFC 9457 extension members: which call of which program failed."""
    if isinstance(exc, CallFailedError):
        return {"program_id": exc.program_id, "call_id": exc.call_id, "variable": exc.variable}
    program_id = getattr(exc, "program_id", None)
    return {"program_id": program_id} if isinstance(program_id, str) else {}


# Errors mapped to a response and done with; any other exception is answered too, then
# re-raised so that the server logs it (Starlette's ServerErrorMiddleware does the same).
HANDLED_ERRORS = (ApiError, RequestValidationError, ValidationError, SchedulerError,
                  EngineError, StarletteHTTPException)


async def _bounded(closing: Awaitable[None], timeout_s: float, what: str) -> None:
    """Shut a part down within `timeout_s` (a stuck engine or store must not keep the
    process from exiting); past it, the part is abandoned and the shutdown goes on."""
    try:
        await asyncio.wait_for(closing, max(timeout_s, 1.0))
    except TimeoutError:
        log.error("%s did not shut down within %.1f s; exiting anyway", what,
                  max(timeout_s, 1.0))


async def _on_error(request: Request, exc: Exception) -> Response:
    return error_response(request, exc)


async def _on_client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody is listening; the status is for the logs


def create_app(runtime: ServerRuntime | Settings) -> FastAPI:
    """An app around `runtime` (or a new `ServerRuntime` built from settings)."""
    if isinstance(runtime, Settings):
        runtime = ServerRuntime(runtime)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        # Only `progserve serve` asks (`app.state.tune_collector`): an app embedded in a
        # longer-lived process (tests, notebooks) keeps its collector as it is.
        collector = None
        if getattr(app.state, "tune_collector", False):
            collector = ServerCollector(runtime.settings.gc_full_scan_interval_s,
                                        app.state.observability.metrics.observe_gc_pause)
            collector.install()
        try:
            yield
        finally:
            if collector is not None:
                collector.close()
            await _bounded(runtime.close(), runtime.settings.shutdown_grace_s, "the runtime")
            await app.state.observability.close()

    app = ProgserveApp(
        title="progserve",
        version="0.1.0",
        summary="Serving middleware for agentic LLM programs",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    # Routes match in order: the hot proxy routes first.
    for router in (sglang.router, openai.router, programs.router, health.router):
        app.include_router(router)
    _serve_hot_routes_lean(app)
    install_observability(app, runtime)  # traces, /metrics, /ui (progserve/observability.py)
    # 429 + Retry-After past the limits, before a body is read (progserve/overload.py).
    install_overload_control(app, runtime.scheduler, runtime.settings.limits, runtime.auth,
                      error_response)
    for exc_type in (*HANDLED_ERRORS, Exception):
        app.add_exception_handler(exc_type, _on_error)
    app.add_exception_handler(ClientGone, _on_client_gone)
    app.openapi = lambda: openapi_with_bodies(app)  # type: ignore[method-assign]
    return app


# The generation routes, served as plain Starlette routes ahead of their FastAPI twins.
HOT_ROUTES = (
    ("/generate", sglang.generate, ["POST", "PUT"]),
    ("/v1/chat/completions", openai.chat_completions, ["POST"]),
    ("/v1/completions", openai.completions, ["POST"]),
)


class ProgserveApp(FastAPI):
    """FastAPI with a short path for the generation routes (`HOT_ROUTES`): the app's own
    middleware (admission, `traceparent`) around a direct call of the endpoint, with the
    app's error mapping. It skips the layers those routes never use (FastAPI's exception,
    body-limit, telemetry and exit-stack middleware, the router's matching and its send
    wrappers): a fifth of the proxy's CPU per call. Anything else, and any request under
    a `root_path`, takes the full stack (where the same routes are mounted lean too)."""

    _hot_stack: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["method"], scope["path"]) in _HOT_KEYS \
                and not scope.get("root_path"):
            scope["app"] = self
            stack = self._hot_stack
            if stack is None:
                stack = self._hot_stack = self._build_hot_stack()
            await stack(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def _build_hot_stack(self) -> ASGIApp:
        app: ASGIApp = _hot_endpoints
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app


async def _hot_endpoints(scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive, send)
    try:
        response = await _HOT_ENDPOINTS[scope["method"], scope["path"]](request)
    except ClientGone:
        response = Response(status_code=499)
    except HANDLED_ERRORS as exc:
        response = error_response(request, exc)
    except Exception as exc:
        await error_response(request, exc)(scope, receive, send)
        raise
    await response(scope, receive, send)


_HOT_ENDPOINTS = {(method, path): endpoint for path, endpoint, methods in HOT_ROUTES
                  for method in methods}
_HOT_KEYS = frozenset(_HOT_ENDPOINTS)


def _serve_hot_routes_lean(app: FastAPI) -> None:
    """FastAPI's per-request machinery (dependency solving, response validation, route
    contexts) costs about 60 us per call, a large share of the latency a proxy may add.
    These handlers take only the `Request` and parse their bodies themselves, so they are
    mounted as plain Starlette routes in front; the FastAPI routes stay for the OpenAPI
    schema (and are never reached). Errors go through the same exception handlers."""
    lean = [Route(path, endpoint, methods=methods) for path, endpoint, methods in HOT_ROUTES]
    app.router.routes[:0] = lean


def openapi_with_bodies(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the request bodies that routes parse themselves (see
    `api.common.request_body`), with every error documented in its shape."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                         routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["OpenAIError"] = _OPENAI_ERROR_SCHEMA
    components["Problem"] = _PROBLEM_SCHEMA
    for path, operations in schema.get("paths", {}).items():
        problem = path.startswith(PROBLEM_PREFIXES)
        for operation in operations.values():
            components.update(operation.pop(BODY_DEFS_KEY, {}))
            operation.setdefault("responses", {}).pop("422", None)
            operation["responses"]["4XX"] = _error_response_doc(problem)
            operation["responses"]["5XX"] = _error_response_doc(problem, server=True)
            _document_other_bodies(path, operation)
    runtime: ServerRuntime = app.state.runtime
    registry = getattr(runtime.tools, "registry", None)
    limits = runtime.settings.limits
    bodies = {body["title"]: body for operations in schema.get("paths", {}).values()
              for operation in operations.values()
              for body in _json_body_schemas(operation) if "title" in body}
    add_server_facts({**bodies, **components}, max_tokens=limits.max_tokens,
                     tool_names=registry.names() if registry is not None else None,
                     max_batch=getattr(limits, "max_batch", None))
    app.openapi_schema = schema
    return schema


def _json_body_schemas(operation: dict[str, Any]) -> list[dict[str, Any]]:
    content = operation.get("requestBody", {}).get("content", {})
    return [media["schema"] for media in content.values() if "schema" in media]


# Answers that are not JSON: SSE streams (`stream: true`, `?stream=true`) and plain text.
_OTHER_BODIES = {
    "/generate": "text/event-stream",
    "/v1/chat/completions": "text/event-stream",
    "/v1/completions": "text/event-stream",
    "/v1/programs/{program_id}/variables/{name}": "text/event-stream",
    "/flush_cache": "text/plain",
}


def _document_other_bodies(path: str, operation: dict[str, Any]) -> None:
    media_type = _OTHER_BODIES.get(path)
    ok = operation["responses"].get("200")
    if media_type is None or ok is None:
        return
    if media_type == "text/event-stream":  # one schema per event: `data: <JSON or [DONE]>`
        body = {"type": "object", "properties": {"data": {"type": "string"}}}
    else:
        body = {"type": "string"}
    ok.setdefault("content", {})[media_type] = {"schema": body}


_OPENAI_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]},
        },
    }},
}
_PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": ["string", "null"]},
        "param": {"type": ["string", "null"]},
    },
}


def _error_response_doc(problem: bool, server: bool = False) -> dict[str, Any]:
    who = "server or engine error" if server else "client error"
    if problem:
        return {"description": f"{who} (RFC 9457 problem JSON)", "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    return {"description": f"{who} (OpenAI error shape)", "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}}}
