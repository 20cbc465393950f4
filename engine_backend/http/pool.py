"""`ConnectionPool`: the transport servers use. Keep-alive HTTP/1.1 connections to one
origin, reused last-in first-out (the warmest socket first).

Why not httpx or aiohttp: on the proxy's hot path both cost more CPU per call than this
pool, aiohttp's client (C parser, pooled) more than the 0.1 ms issue 20.5 allowed
(`scripts/bench_http_client.py`; the figures in docs/architecture.md, HTTP engines).
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

from ..errors import EngineUnavailableError
from .connection import Connection
from .transport import Request


class ConnectionPool:
    def __init__(self, origin: str, *, connect_timeout: float = 5.0, max_idle: int = 256) -> None:
        """`origin`: `http(s)://host[:port]` (a path is ignored: requests carry theirs)."""
        url = urlsplit(origin)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {origin!r}")
        self.origin = f"{url.scheme}://{url.netloc}"
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._host_line = (f"Host: {url.netloc.rsplit('@', 1)[-1]}\r\nUser-Agent: progserve\r\n"
                           "Accept: */*\r\n").encode("latin-1")
        self._connect_timeout = connect_timeout
        self._idle: list[Connection] = []
        self._max_idle = max_idle
        self._closed = False
        self._headers_seen: object = None
        self._head_tail = self._host_line

    def _encode(self, request: Request) -> bytes:
        if request.headers is not self._headers_seen:  # the client passes one mapping
            self._headers_seen = request.headers
            extra = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
            self._head_tail = self._host_line + extra.encode("latin-1")
        head = f"{request.method} {request.target} HTTP/1.1\r\n".encode("latin-1") + \
            self._head_tail
        body = request.body
        if body is None:
            return head + b"\r\n"
        return head + b"Content-Type: application/json\r\nContent-Length: " + \
            str(len(body)).encode() + b"\r\n\r\n" + body

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(loop, self), self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None)
        except (OSError, TimeoutError) as exc:
            raise EngineUnavailableError(
                f"{self.origin} unreachable: {type(exc).__name__}: {exc}") from exc
        return conn

    def _take_idle(self) -> Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    def release(self, conn: Connection) -> None:
        if conn.reusable and not self._closed and len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            conn.close()

    async def send(self, request: Request) -> Connection:
        """Send and wait for the answer's headers. A kept-alive connection the server
        closed while idle fails before any byte comes back: then retry on a new one."""
        if self._closed:
            raise EngineUnavailableError(f"{self.origin}: client closed")
        data = self._encode(request)
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

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()
