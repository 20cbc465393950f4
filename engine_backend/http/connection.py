"""One keep-alive HTTP/1.1 connection: requests go out in one `write`, answers are parsed
with httptools (llhttp, the parser uvicorn uses) as bytes arrive.

A connection is also the `Response` of the exchange it carries (no object per answer):
the caller reads the body with `next_chunk`, then `release()` hands the connection back to
its pool, which keeps it only if the answer was read to its end.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

import httptools

from ..errors import EngineUnavailableError

if TYPE_CHECKING:
    from .pool import ConnectionPool

_HIGH_WATER = 1 << 20  # stop reading the socket while this much body waits unread
_LOW_WATER = 1 << 18


class Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, pool: ConnectionPool) -> None:
        self.loop = loop
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._begin()

    def _begin(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.headers_done = False
        self.keep_alive = False
        self.complete = False
        self.got_bytes = False
        self.error: EngineUnavailableError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False

    def send(self, data: bytes) -> None:
        self._begin()
        assert self.transport is not None
        self.transport.write(data)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = EngineUnavailableError(f"malformed HTTP answer: {exc}")
            self.close()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and self._close_delimited():
            self.complete = True  # the body ran to the end of the connection
        elif not self.complete and self.error is None:
            self.error = EngineUnavailableError(
                f"connection lost{f': {exc}' if exc else ''}")
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        # Asked now: llhttp resets its flags once the message completes.
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # the reading side
    def _close_delimited(self) -> bool:
        return "content-length" not in self.headers and \
            "chunked" not in self.headers.get("transfer-encoding", "")

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def wait_headers(self) -> None:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self._wait()

    async def next_chunk(self) -> bytes | None:
        while not self.chunks:
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            await self._wait()
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.paused and self.buffered < _LOW_WATER and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and not self.chunks

    def release(self) -> None:
        self.pool.release(self)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        if not self.complete and self.error is None:
            self.error = EngineUnavailableError("connection closed")
        self._wake()
