"""What the HTTP engines share: a lean keep-alive HTTP/1.1 client, SSE reading, and the
mapping of an upstream's HTTP errors to typed engine errors.

Why not httpx: on the proxy's hot path httpx spends milliseconds of CPU per request
(anyio streams, h11, a trace machinery), more than the whole budget progserve may add to
a call. This client writes each request in one `write`, parses answers with httptools
(llhttp, the parser uvicorn uses), and keeps connections alive in a LIFO pool: about a
tenth of the cost. It speaks exactly what the engines need: JSON requests, JSON or SSE
answers, `Content-Length`, chunked or close-delimited bodies, http and https.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson
from pydantic import BaseModel, Field

from .errors import (
    EngineError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    UnknownRequestError,
)

SSE_DONE = b"[DONE]"
_HIGH_WATER = 1 << 20  # stop reading a socket while this much body waits unread
_LOW_WATER = 1 << 18


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; answers are parsed as bytes arrive."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
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

    # consumer side
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
        """The next piece of the body, or None at its end."""
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

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        if not self.complete and self.error is None:
            self.error = EngineUnavailableError("connection closed")
        self._wake()


class HTTPResponse:
    """An answer whose body is read on demand (`aread`, `aiter_bytes`, `aiter_sse`)."""

    __slots__ = ("_conn", "status", "headers")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers

    def close(self) -> None:
        """Drop the connection mid-answer (how a client aborts over HTTP)."""
        self._conn.close()

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        while (chunk := await self._conn.next_chunk()) is not None:
            yield chunk

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_bytes()])

    async def json(self) -> Any:
        return orjson.loads(await self.aread())

    async def aiter_sse(self) -> AsyncIterator[dict[str, Any]]:
        """The JSON payloads of a `data: ...` event stream, up to `data: [DONE]`. It reads
        on to the end of the body, so the connection goes back to the pool."""
        pending = b""
        done = False
        async for chunk in self.aiter_bytes():
            pending += chunk
            if b"\n" not in chunk:
                continue
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if done or not line.startswith(b"data:"):
                    continue  # blank separators, comments, `event:` lines, the tail
                payload = line[5:].strip()
                if payload == SSE_DONE:
                    done = True
                elif payload:
                    event = _decode_event(payload)
                    if isinstance(event, dict):
                        yield event
        if pending.startswith(b"data:") and not done:
            payload = pending[5:].strip()
            if payload and payload != SSE_DONE:
                event = _decode_event(payload)
                if isinstance(event, dict):
                    yield event


def _decode_event(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise EngineUnavailableError(f"upstream sent a malformed event: {payload[:200]!r}") \
            from exc


class HTTPPool:
    """Keep-alive connections to one upstream (`base_url` may carry a path prefix)."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        connect_timeout: float = 5.0,
        max_idle: int = 256,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._prefix = url.path.rstrip("/")
        host_header = url.netloc.rsplit("@", 1)[-1]
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head_tail = (f"Host: {host_header}\r\nUser-Agent: progserve\r\n"
                           f"Accept: */*\r\n{extra}").encode("latin-1")
        self._connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._max_idle = max_idle
        self._closed = False

    def _encode(self, method: str, path: str, body: bytes | None) -> bytes:
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\n".encode("latin-1") + self._head_tail
        if body is None:
            return head + b"\r\n"
        return head + b"Content-Type: application/json\r\nContent-Length: " + \
            str(len(body)).encode() + b"\r\n\r\n" + body

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None)
        except (OSError, TimeoutError) as exc:
            raise EngineUnavailableError(
                f"{self.base_url} unreachable: {type(exc).__name__}: {exc}") from exc
        return conn

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    def _release(self, conn: _Connection) -> None:
        if conn.reusable and not self._closed and len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            conn.close()

    async def _open(self, method: str, path: str, json: Any) -> _Connection:
        """Send a request and wait for the answer's headers. A kept-alive connection the
        server closed while idle fails before any byte comes back: retry on a new one."""
        if self._closed:
            raise EngineUnavailableError(f"{self.base_url}: client closed")
        data = self._encode(method, path, None if json is None else orjson.dumps(json))
        while True:
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                conn.send(data)
                await conn.wait_headers()
                return conn
            except EngineUnavailableError:
                conn.close()
                if reused and not conn.got_bytes:
                    continue
                raise
            except BaseException:
                conn.close()
                raise

    @asynccontextmanager
    async def stream(self, method: str, path: str, *, json: Any = None
                     ) -> AsyncIterator[HTTPResponse]:
        """The answer, its body read by the caller. Leaving the block early (an error,
        the caller stopping) closes the connection, which tells the server to stop."""
        conn = await self._open(method, path, json)
        try:
            yield HTTPResponse(conn)
        finally:
            self._release(conn)

    async def fetch(self, method: str, path: str, *, json: Any = None) -> tuple[int, bytes]:
        """A whole exchange, (status, body), with no timeout. Cancelling it closes the
        connection, which tells the server to stop."""
        conn = await self._open(method, path, json)
        try:
            parts: list[bytes] = []
            while (part := await conn.next_chunk()) is not None:
                parts.append(part)
            return conn.status, b"".join(parts)
        finally:
            self._release(conn)

    async def request(self, method: str, path: str, *, json: Any = None,
                      timeout: float | None = None) -> tuple[int, bytes]:
        """A whole exchange: (status, body)."""
        try:
            async with asyncio.timeout(timeout):
                return await self.fetch(method, path, json=json)
        except TimeoutError as exc:
            raise EngineUnavailableError(f"{self.base_url}{path}: no answer in {timeout}s") \
                from exc

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


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


class HTTPEngineConfig(BaseModel):
    """Knobs of the HTTP engines (`settings.http_engine`), for `--engine sglang|openai`."""

    api_key: str | None = Field(None, description="bearer key sent to the upstream engine")
    connect_timeout_s: float = Field(5.0, gt=0, description="connect and control-call timeout")
    send_priority: bool = Field(
        True, description="sglang: pass engine ranks down as `priority` (the server runs "
        "--enable-priority-scheduling)"
    )
    openai_priority: bool = Field(
        False, description="openai: pass engine ranks down as `priority` (the server is vLLM "
        "run with --scheduling-policy priority)"
    )
    low_priority_values_first: bool = Field(
        False, description="sglang: the server runs --schedule-low-priority-values-first"
    )
    sglang_priority_file: Path | None = Field(
        None,
        description="sglang: write KV retention hints (pins, ended programs) to this file "
                    "for progserve's SGLang plugin (the servers' $PROGSERVE_PRIORITY_FILE); "
                    "a directory: this process's own file in it, for several progserve "
                    "processes in front of the same servers",
    )
    logprobs: bool | None = Field(
        None, description="openai: does the server return logprobs (None: probe at start)"
    )
