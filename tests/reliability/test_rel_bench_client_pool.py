"""`bench load` lost chats whose answers the server had sent (issue 18's "0 lost"): the
client's own connection pool closed the socket under them. httpcore (1.0.9,
encode/httpcore#1110) hands an idle connection to a request, and until that request's
task runs, another request's sweep may find the connection past its keep-alive expiry
and close it; if the first request was sent in between, its answer is lost. A stalled
client loop (2,000 programs on two cores) is all it takes. This replays that order
exactly against the bench's pool settings (`client_limits`): it must not lose the
answer."""

from __future__ import annotations

import asyncio
import time

import httpx

from progserve.bench.load import client_limits

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


async def keep_alive_server(delay_s: float) -> tuple[asyncio.base_events.Server, int]:
    """Answers every request on a connection, after `delay_s` for POSTs."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if head.startswith(b"POST"):
                    await asyncio.sleep(delay_s)
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_stalled_client_never_closes_a_connection_under_a_sent_request() -> None:
    limits = client_limits(4)
    server_a, port_a = await keep_alive_server(delay_s=0.3)
    server_b, port_b = await keep_alive_server(delay_s=0.0)
    async with server_a, server_b, httpx.AsyncClient(limits=limits, timeout=10,
                                                      trust_env=False) as client:
        # Idle pooled connections: three to B (first in the pool), then one to A.
        await asyncio.gather(*(client.get(f"http://127.0.0.1:{port_b}/") for _ in range(3)))
        await client.get(f"http://127.0.0.1:{port_a}/")
        stall = (limits.keepalive_expiry or 1.0) + 0.2

        async def stalled_loop() -> None:
            time.sleep(stall)  # the client's loop starved past the keep-alive expiry

        # The POST is handed A's idle connection and yields (its locks) before using it;
        # the loop stalls; another request's sweep then closes what it finds expired:
        # B's connections first, each close yielding, while the POST goes out on A's
        # connection, then A's, under it.
        post = asyncio.ensure_future(client.post(f"http://127.0.0.1:{port_a}/", content=b"x"))
        stall_task = asyncio.ensure_future(stalled_loop())
        sweep = asyncio.ensure_future(client.get(f"http://127.0.0.1:{port_a}/"))
        response = await post
        await asyncio.gather(stall_task, sweep)
    assert response.status_code == 200 and response.text == "ok"
