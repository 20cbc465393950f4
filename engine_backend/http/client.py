"""`HTTPClient`: JSON requests to one upstream (`base_url` may carry a path prefix) over a
`Transport`, and `HTTPResponse`, an answer read on demand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import orjson

from ..errors import EngineUnavailableError
from .pool import ConnectionPool
from .sse import iter_sse
from .transport import Request, Response, Transport


class HTTPResponse:
    """An answer whose body is read on demand (`aread`, `aiter_bytes`, `aiter_sse`)."""

    __slots__ = ("_raw", "status", "headers")

    def __init__(self, raw: Response) -> None:
        self._raw = raw
        self.status = raw.status
        self.headers = raw.headers

    def close(self) -> None:
        """Drop the exchange mid-answer (how a client aborts over HTTP)."""
        self._raw.close()

    def release(self) -> None:
        """Done with the answer: a fully read one leaves its connection for reuse."""
        self._raw.release()

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        raw = self._raw
        while (chunk := await raw.next_chunk()) is not None:
            yield chunk

    async def aread(self) -> bytes:
        raw = self._raw
        parts: list[bytes] = []
        while (chunk := await raw.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    async def json(self) -> Any:
        return orjson.loads(await self.aread())

    def aiter_sse(self) -> AsyncIterator[dict[str, Any]]:
        return iter_sse(self.aiter_bytes())


class HTTPClient:
    def __init__(self, base_url: str, *, headers: Mapping[str, str] | None = None,
                 transport: Transport | None = None, connect_timeout: float = 5.0) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._prefix = url.path.rstrip("/")
        self._headers = dict(headers or {})
        self.transport: Transport = transport if transport is not None else \
            ConnectionPool(base_url, connect_timeout=connect_timeout)

    async def send(self, method: str, path: str, json: Any = None) -> HTTPResponse:
        """The answer once its headers are in; the caller reads it, then `release`s it."""
        body = None if json is None else orjson.dumps(json)
        return HTTPResponse(await self.transport.send(
            Request(method, self._prefix + path, body, self._headers)))

    @asynccontextmanager
    async def stream(self, method: str, path: str, *, json: Any = None
                     ) -> AsyncIterator[HTTPResponse]:
        """The answer, its body read by the caller. Leaving the block before the end (an
        error, the caller stopping) drops the exchange, which tells the server to stop."""
        response = await self.send(method, path, json)
        try:
            yield response
        finally:
            response.release()

    async def fetch(self, method: str, path: str, *, json: Any = None) -> tuple[int, bytes]:
        """A whole exchange, (status, body), with no timeout. Cancelling it drops the
        exchange, which tells the server to stop."""
        body = None if json is None else orjson.dumps(json)
        raw = await self.transport.send(Request(method, self._prefix + path, body, self._headers))
        try:  # read here, not through an HTTPResponse: the hot path of whole answers
            parts: list[bytes] = []
            while (part := await raw.next_chunk()) is not None:
                parts.append(part)
            return raw.status, b"".join(parts)
        finally:
            raw.release()

    async def request(self, method: str, path: str, *, json: Any = None,
                      timeout: float | None = None) -> tuple[int, bytes]:
        """A whole exchange, (status, body), within `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                return await self.fetch(method, path, json=json)
        except TimeoutError as exc:
            raise EngineUnavailableError(f"{self.base_url}{path}: no answer in {timeout}s") \
                from exc

    async def aclose(self) -> None:
        await self.transport.aclose()
