"""Server-sent events from raw body pieces: the JSON payloads of `data:` lines."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from ..errors import EngineUnavailableError

SSE_DONE = b"[DONE]"


async def iter_sse(pieces: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a `data: ...` event stream, up to `data: [DONE]`. Reads on to
    the end of the body, so a pooled connection can be reused."""
    pending = b""
    done = False
    async for piece in pieces:
        pending += piece
        if b"\n" not in piece:
            continue
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if done or not line.startswith(b"data:"):
                continue  # blank separators, comments, `event:` lines, the tail
            payload = line[5:].strip()
            if payload == SSE_DONE:
                done = True
            elif payload:
                event = decode_event(payload)
                if isinstance(event, dict):
                    yield event
    if pending.startswith(b"data:") and not done:
        payload = pending[5:].strip()
        if payload and payload != SSE_DONE:
            event = decode_event(payload)
            if isinstance(event, dict):
                yield event


def decode_event(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise EngineUnavailableError(f"upstream sent a malformed event: {payload[:200]!r}") \
            from exc
