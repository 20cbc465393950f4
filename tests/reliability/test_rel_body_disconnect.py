"""A client that leaves while its request's body is still arriving is a client that left
(499, nothing logged as a server error), on the lean hot routes and the FastAPI ones: it
was an "unhandled error" with two tracebacks each (seen under `bench load` at 2,000
connections), so any client could fill the server's error log by hanging up mid-body."""

from __future__ import annotations

import logging

import pytest

from progserve.app import create_app
from progserve.config import Settings


async def send_half_a_body(app, path: str) -> list[dict]:  # type: ignore[no-untyped-def]
    pieces = [{"type": "http.request", "body": b'{"model": "sim", "mess', "more_body": True},
              {"type": "http.disconnect"}]

    async def receive() -> dict:
        return pieces.pop(0) if pieces else {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"content-type", b"application/json")],  # no length: streamed
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80), "scheme": "http"}
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/programs"])
async def test_a_client_gone_mid_body_is_not_a_server_error(path, caplog) -> None:  # type: ignore[no-untyped-def]
    app = create_app(Settings(sim={"time_scale": 0.001}))
    async with app.router.lifespan_context(app):
        with caplog.at_level(logging.ERROR):
            sent = await send_half_a_body(app, path)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [499]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
