"""Helpers every router shares: bounded JSON bodies, fast JSON and SSE responses, the
caller's tenant, program identity from headers, and streams that abort their engine
request when the client goes away."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import orjson
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect

from ..auth import SCOPE_CALLER, Caller
from ..errors import BadRequestError, PayloadTooLargeError, classify, openai_body
from .strict_json import validate_body

if TYPE_CHECKING:
    from ..runtime import ServerRuntime

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PROGRAM_ID_HEADER = "X-Program-Id"
CALL_ID_HEADER = "X-Call-Id"


def runtime_of(request: Request) -> ServerRuntime:
    return request.app.state.runtime


def caller_of(request: Request) -> Caller:
    """Who sends the request (401 when keys are on and the key is missing or wrong): as
    the admission middleware found it, else looked up now."""
    caller = request.scope.get(SCOPE_CALLER)
    if caller is None:
        caller = request.app.state.runtime.auth.caller_for(request.headers)
    return caller


def tenant_of(request: Request) -> str:
    """The caller's tenant (401 as `caller_of`). Called in the handler, not as a FastAPI
    dependency: a sync dependency runs in a thread."""
    return caller_of(request).tenant


def new_id(prefix: str) -> str:
    return f"{prefix}-{random_hex(10)}"


def random_hex(nbytes: int) -> str:
    """`2 * nbytes` random hex digits (what `uuid4().hex` gives, at a third of its cost)."""
    return os.urandom(nbytes).hex()


# ------------------------------------------------------------------------ request body


async def read_json(request: Request) -> Any:
    """The request body as JSON, refusing bodies over `limits.max_request_bytes` (413)
    before reading them whole."""
    try:
        body = await _read_body(request)
    except ClientDisconnect:  # it left mid-body: nothing to answer, nothing gone wrong
        raise ClientGone() from None
    if not body:
        raise BadRequestError("the request needs a JSON body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"the body is not valid JSON: {exc}") from exc


async def _read_body(request: Request) -> bytes:
    """The body, refused past `limits.max_request_bytes` (declared or streamed)."""
    limit = runtime_of(request).settings.limits.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequestError("invalid Content-Length header")
        if int(declared) > limit:
            raise PayloadTooLargeError(f"request body over the {limit}-byte limit")
        return await request.body()
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise PayloadTooLargeError(f"request body over the {limit}-byte limit")
        parts.append(part)
    return b"".join(parts)


async def read_model(request: Request, model: type[M]) -> M:
    data = await read_json(request)
    if not isinstance(data, dict):
        raise BadRequestError("the JSON body must be an object")
    return validate_body(model, data)  # JSON types, strictly (strict_json.py)


# ------------------------------------------------------------------------ responses


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None,
                  media_type: str = "application/json",
                  background: BackgroundTask | None = None) -> Response:
    """`background` runs once the answer is written."""
    return Response(orjson.dumps(data), status_code=status, headers=headers,
                    media_type=media_type, background=background)


def sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def sse_error(exc: BaseException) -> bytes:
    """An error after the stream started: the status line is gone, so it goes in-band."""
    return sse(openai_body(classify(exc)))


class EventStreamResponse(Response):
    """Server-sent events from an async iterator of byte pieces.

    Leaner than Starlette's `StreamingResponse` on the hot path: one watcher task instead
    of an anyio task group, and the piece that ends with `data: [DONE]` goes out together
    with the end of the body (one write instead of two). When the client disconnects,
    the task iterating the body is cancelled: the generators' cleanup closes their
    scheduler streams, which aborts the engine requests."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], headers: Mapping[str, str] | None = None):
        self.body_iterator = body
        self.status_code = 200
        self.background = None
        self.init_headers({**SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        state = {"complete": False, "gone": False}

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not state["complete"]:
                        state["gone"] = True
                        task.cancel()
                    return

        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            async for piece in self.body_iterator:
                if state["complete"]:
                    continue  # nothing may follow [DONE]; let the generator finish
                last = piece.endswith(SSE_DONE)
                state["complete"] = last
                await send({"type": "http.response.body", "body": piece, "more_body": not last})
            if not state["complete"]:
                state["complete"] = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["gone"]:
                raise
            task.uncancel()  # the client left
        finally:
            watcher.cancel()
            # Cancelled while sending (not inside the generator): close it here, so its
            # cleanup runs now and aborts the engine request.
            await close_quietly(self.body_iterator)


def sse_response(body: AsyncIterator[bytes], headers: Mapping[str, str] | None = None
                 ) -> EventStreamResponse:
    return EventStreamResponse(body, headers)


# ------------------------------------------------------------------------ program identity


@dataclass(slots=True, frozen=True)
class ProgramIdentity:
    """Which program a proxied call belongs to, and where it sits in it."""

    program_id: str | None = None
    thread_id: str | None = None
    parent_ids: tuple[str, ...] = ()
    call_id: str | None = None
    end: bool = False


_TRUE = {"1", "true", "yes", "on"}


def _x_headers(headers: Headers) -> dict[str, str]:
    """The request's `X-` headers in one pass (the first of repeated ones, as
    `Headers.get` gives): a Starlette lookup scans every header, and there are seven."""
    found: dict[str, str] = {}
    for name, value in headers.raw:
        if name[:2] in (b"x-", b"X-"):
            found.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return found


def _split_ids(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(p.strip() for p in value.split(",") if p.strip())


def program_identity(headers: Mapping[str, str], metadata: Mapping[str, Any] | None = None
                     ) -> ProgramIdentity:
    """Headers win; then the body's `metadata` (`program_id`, `thread_id`,
    `parent_call_ids`, `call_id`, `program_end`)."""
    if isinstance(headers, Headers):
        headers = _x_headers(headers)
    meta = metadata or {}
    program_id = headers.get("x-program-id") or meta.get("program_id") or None
    thread_id = headers.get("x-thread-id") or meta.get("thread_id") or None
    parents_raw = (headers.get("x-parent-call-ids") or headers.get("x-parent-calls")
                   or meta.get("parent_call_ids") or meta.get("parent_calls"))
    if isinstance(parents_raw, list):
        parents = tuple(str(p) for p in parents_raw)
    else:
        parents = _split_ids(parents_raw)
    call_id = headers.get("x-call-id") or meta.get("call_id") or None
    end_raw = headers.get("x-program-end") or meta.get("program_end") or ""
    return ProgramIdentity(
        program_id=str(program_id) if program_id is not None else None,
        thread_id=str(thread_id) if thread_id is not None else None,
        parent_ids=parents,
        call_id=str(call_id) if call_id is not None else None,
        end=str(end_raw).strip().lower() in _TRUE,
    )


# ------------------------------------------------------------------------ disconnects


async def close_quietly(stream: AsyncIterator[Any]) -> None:
    """Close a scheduler stream even from inside a cancelled scope: closing it is what
    aborts the engine request and frees its KV, so it must not be cancelled itself."""
    aclose = getattr(stream, "aclose", None)
    if aclose is None or getattr(stream, "ag_frame", True) is None:
        return  # not closable, or already finished (the common case: nothing to do)
    task = asyncio.current_task()
    try:
        if task is not None and task.cancelling():
            with anyio.CancelScope(shield=True):  # the task is being cancelled
                await aclose()
        else:
            await aclose()
    except Exception:  # noqa: BLE001 - the client is gone; nothing to report to
        pass


# How long a non-streamed call runs before its client's connection is watched.
DISCONNECT_WATCH_AFTER_S = 0.02


class ClientGone(Exception):
    """The client disconnected before a non-streamed answer was ready (or before its
    request's body arrived)."""


async def unless_disconnected(request: Request, work: Callable[[], Awaitable[T]],
                              *, grace_s: float = DISCONNECT_WATCH_AFTER_S) -> T:
    """Run `work()` but cancel it when the client disconnects (uvicorn keeps running a
    handler whose client left; for a long generation that wastes the engine).

    The watch starts `grace_s` in: most proxied calls are done by then, and a watcher
    task per call costs about 3% of a call's CPU. A client gone earlier is noticed then."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    gone = done = False
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        nonlocal gone
        message = await request.receive()
        if message["type"] == "http.disconnect" and not done:
            gone = True
            task.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = loop.create_task(watch())

    timer = loop.call_later(grace_s, start_watching)
    try:
        return await work()
    except asyncio.CancelledError:
        if gone:
            task.uncancel()
            raise ClientGone() from None
        raise
    finally:
        done = True
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


# ------------------------------------------------------------------------ OpenAPI

BODY_DEFS_KEY = "x-progserve-defs"


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that parses `model` itself (with orjson, after the size
    check): the schema goes into the OpenAPI document, its `$defs` are moved to
    `components.schemas` by `app.openapi_with_bodies`."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {
        "requestBody": {"required": True,
                        "content": {"application/json": {"schema": schema}}},
        BODY_DEFS_KEY: defs,
    }
