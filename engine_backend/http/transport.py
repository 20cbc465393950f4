"""The seam between `HTTPClient` and the network: one request in, one answer out.

`ConnectionPool` (keep-alive HTTP/1.1 sockets) is the transport servers use; tests inject
`MockTransport`, whose handler answers each request in-process, so an engine can be checked
against any upstream behaviour (a recorded answer, a stream cut mid-way, a slow server)
without starting one.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from ..errors import EngineUnavailableError


@dataclass(slots=True)
class Request:
    """One exchange: `target` is the path on the upstream's origin (the base URL's path
    prefix included); `headers` are the client's own (the same mapping every time)."""

    method: str
    target: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return None if self.body is None else orjson.loads(self.body)


class Response(Protocol):
    """An answer whose headers have arrived; its body is read piece by piece."""

    status: int
    headers: Mapping[str, str]

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body, or None at its end. Raises EngineUnavailableError
        when the exchange breaks."""
        ...

    def close(self) -> None:
        """Drop the exchange now, from any task (how a client aborts over HTTP)."""
        ...

    def release(self) -> None:
        """The caller is done: a fully read answer may leave its connection for reuse."""
        ...


class Transport(Protocol):
    async def send(self, request: Request) -> Response:
        """Send `request` and return once the answer's status and headers are in. Raises
        EngineUnavailableError when the upstream cannot be reached."""
        ...

    async def aclose(self) -> None: ...


# ------------------------------------------------------------------------------ for tests

Body = bytes | Iterable[bytes] | AsyncIterable[bytes]


class MockResponse:
    """An answer made in-process. `body` may be bytes, pieces, or an async iterator of
    pieces (a stream the handler paces); an `OSError` raised by the iterator breaks the
    exchange as a lost connection does. `closed` tells a test that the client dropped it."""

    def __init__(self, status: int = 200, body: Body = b"",
                 headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.headers = dict(headers or {})
        self._pieces = _as_async_iter(body)
        self._closed = asyncio.Event()
        self.closed = False
        self.released = False
        self.complete = False

    @classmethod
    def json(cls, data: Any, status: int = 200) -> MockResponse:
        return cls(status, orjson.dumps(data), {"content-type": "application/json"})

    @classmethod
    def sse(cls, events: Iterable[Any] | AsyncIterable[Any], *, done: bool = True,
            status: int = 200) -> MockResponse:
        """`data:` events from dicts (JSON) or bytes (sent as they are), then `[DONE]`."""
        return cls(status, _sse_pieces(events, done), {"content-type": "text/event-stream"})

    async def next_chunk(self) -> bytes | None:
        if self.closed:
            raise EngineUnavailableError("connection closed")
        read = asyncio.ensure_future(anext(self._pieces, None))
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait((read, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if not read.done():
            read.cancel()
            raise EngineUnavailableError("connection closed")
        try:
            piece = read.result()
        except OSError as exc:
            raise EngineUnavailableError(f"connection lost: {exc}") from exc
        self.complete = piece is None
        return piece

    def close(self) -> None:
        self.closed = True
        self._closed.set()

    def release(self) -> None:
        self.released = True
        if not self.complete:
            self.close()


Handler = Callable[[Request], MockResponse | Awaitable[MockResponse]]


class MockTransport:
    """Answers every request with `handler(request)` (sync or async); keeps the requests.
    The handler may raise EngineUnavailableError to play an unreachable upstream."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.closed = False

    async def send(self, request: Request) -> MockResponse:
        if self.closed:
            raise EngineUnavailableError("transport closed")
        self.requests.append(request)
        answer = self.handler(request)
        if inspect.isawaitable(answer):
            answer = await answer
        return answer  # type: ignore[return-value]

    def sent(self, target: str) -> list[Any]:
        """The JSON bodies of the requests sent to `target` (path without the prefix)."""
        return [r.json() for r in self.requests if r.target.endswith(target)]

    async def aclose(self) -> None:
        self.closed = True


async def _as_async_iter(body: Body) -> AsyncIterator[bytes]:
    if isinstance(body, bytes | bytearray):
        if body:
            yield bytes(body)
        return
    if isinstance(body, AsyncIterable):
        async for piece in body:
            yield piece
        return
    for piece in body:
        yield piece


async def _sse_pieces(events: Iterable[Any] | AsyncIterable[Any], done: bool
                      ) -> AsyncIterator[bytes]:
    async for event in _as_async_events(events):
        data = event if isinstance(event, bytes) else orjson.dumps(event)
        yield b"data: " + data + b"\n\n"
    if done:
        yield b"data: [DONE]\n\n"


async def _as_async_events(events: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(events, AsyncIterable):
        async for event in events:
            yield event
    else:
        for event in events:
            yield event
