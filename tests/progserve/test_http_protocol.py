"""progserve's uvicorn protocol sends a response's head and body in one write, and never
holds a head past the event-loop turn (a stream's headers still go out at once)."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
import uvicorn

from progserve.commands.serve import uvicorn_options
from progserve.http_protocol import CoalescingHttpToolsProtocol, CoalescingTransport


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


async def test_head_and_body_go_out_in_one_write():
    raw = RecordingTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(HEAD)
    transport.write(b"{}")
    assert raw.writes == [HEAD + b"{}"]
    await asyncio.sleep(0)  # the flush scheduled for the head finds nothing held
    assert raw.writes == [HEAD + b"{}"]
    transport.write(b"more")  # not a head: straight through
    assert raw.writes[-1] == b"more"
    assert not transport.is_closing()  # everything else is the socket's transport


async def test_a_head_alone_goes_out_by_the_end_of_the_loop_turn():
    raw = RecordingTransport()
    transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(HEAD)
    assert raw.writes == []
    await asyncio.sleep(0)
    assert raw.writes == [HEAD]
    transport.write(HEAD)
    transport.close()  # closing sends what is held first
    assert raw.writes == [HEAD, HEAD] and raw.closed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _slow_stream_app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    if scope["path"] == "/slow":
        await asyncio.sleep(0.6)
    await send({"type": "http.response.body", "body": b"done"})


@pytest.fixture
async def server():
    port = _free_port()
    config = uvicorn.Config(_slow_stream_app, host="127.0.0.1", port=port,
                            http=CoalescingHttpToolsProtocol, loop="asyncio",
                            log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve())
    while not srv.started:
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    await task


async def test_answers_and_streamed_headers_through_a_real_server(server):
    async with httpx.AsyncClient(base_url=server) as client:
        for _ in range(3):  # keep-alive: one connection, whole answers
            resp = await client.get("/fast")
            assert resp.status_code == 200 and resp.text == "done"
        started = time.monotonic()
        async with client.stream("GET", "/slow") as resp:
            headers_after = time.monotonic() - started
            assert resp.status_code == 200
            assert (await resp.aread()) == b"done"
        assert headers_after < 0.4  # not held until the body, 0.6 s later


def test_progserve_serve_uses_it():
    assert uvicorn_options("info", False)["http"] is CoalescingHttpToolsProtocol
