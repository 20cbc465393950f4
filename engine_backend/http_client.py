"""What the HTTP engines share: a pooled httpx client, SSE reading, and the mapping of an
upstream's HTTP errors to typed engine errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from pydantic import BaseModel, Field

from .errors import (
    EngineError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    UnknownRequestError,
)

SSE_DONE = "[DONE]"


def make_client(
    base_url: str,
    *,
    api_key: str | None = None,
    connect_timeout: float = 5.0,
    read_timeout: float | None = None,
    max_connections: int = 512,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """A keep-alive pool to one upstream. Streams may idle for long between tokens, so
    reads have no timeout by default; connects fail fast."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        headers=headers,
        timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=30.0, pool=None),
        limits=httpx.Limits(max_connections=max_connections,
                            max_keepalive_connections=max_connections, keepalive_expiry=60.0),
        trust_env=False,  # loopback and internal engines: never route through a proxy
        transport=transport,
    )


async def iter_sse_json(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of a `data: ...` event stream, up to `data: [DONE]`."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, `event:` lines
        payload = line[5:].strip()
        if payload == SSE_DONE:
            return
        if not payload:
            continue
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise EngineUnavailableError(f"upstream sent a malformed event: {payload[:200]!r}") \
                from exc
        if isinstance(event, dict):
            yield event


def error_message(body: bytes | str) -> str:
    """The human message of an upstream error body, whatever its JSON shape."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text.strip()[:500] or "no message"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        for key in ("detail", "message"):
            if data.get(key):
                return str(data[key])
    return text.strip()[:500]


def error_for_status(status: int, body: bytes | str, upstream: str) -> EngineError:
    """The typed engine error for an upstream's non-2xx answer."""
    message = f"{upstream}: {error_message(body)}"
    if status == 404:
        return UnknownRequestError(message)
    if status in (429, 503):
        return EngineOverloadedError(message)
    if 400 <= status < 500:
        return InvalidRequestError(message)
    return EngineUnavailableError(f"{message} (HTTP {status})")


def unavailable(exc: httpx.HTTPError, upstream: str) -> EngineUnavailableError:
    return EngineUnavailableError(f"{upstream} unreachable: {type(exc).__name__}: {exc}")


class HTTPEngineConfig(BaseModel):
    """Knobs of the HTTP engines (`settings.http_engine`), for `--engine sglang|openai`."""

    api_key: str | None = Field(None, description="bearer key sent to the upstream engine")
    connect_timeout_s: float = Field(5.0, gt=0, description="connect and control-call timeout")
    send_priority: bool = Field(True, description="sglang: pass priorities down")
    priority_scale: float = Field(
        1000.0, gt=0, description="sglang: priority = -round(progserve priority * scale)"
    )
    low_priority_values_first: bool = Field(
        False, description="sglang: the server runs --schedule-low-priority-values-first"
    )
    logprobs: bool | None = Field(
        None, description="openai: does the server return logprobs (None: probe at start)"
    )
