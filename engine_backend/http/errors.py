"""An upstream's error answers -> the typed engine errors the server maps to HTTP."""

from __future__ import annotations

import orjson

from ..errors import (
    EngineError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    UnknownRequestError,
    UpstreamProtocolError,
)


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


def error_for_status(status: int, body: bytes | str, upstream: str, *,
                     route: str | None = None) -> EngineError:
    """The typed engine error for an upstream's non-2xx answer. `route`: the generation
    route the answer came from; a 404 there means the upstream does not serve it (the
    wrong kind of server, or a model it does not have), never an unknown request id."""
    message = f"{upstream}: {error_message(body)}"
    if status == 404:
        if route is not None:
            return UpstreamProtocolError(f"{upstream}: {route} answered 404 "
                                         f"({error_message(body)})")
        return UnknownRequestError(message)
    if status in (429, 503):
        return EngineOverloadedError(message)
    if 400 <= status < 500:
        return InvalidRequestError(message)
    return EngineUnavailableError(f"{message} (HTTP {status})")
