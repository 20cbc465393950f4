"""A client that drops a stream (or a pending non-streamed call) aborts its engine request
within 100 ms, and the engine's KV for it is released."""

from __future__ import annotations

import socket
import time

import pytest

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime

LONG = 4000  # tokens; at real-time sim speed this runs for tens of seconds


@pytest.fixture(scope="module")
def server(serve_in_thread):
    return serve_in_thread(create_app(ServerRuntime(Settings(sim={"time_scale": 1.0}))))


def engine_stats(server):
    return server.call(server.app.state.runtime.engines[0].stats())


def raw_post(server, path: str, body: bytes) -> socket.socket:
    """A bare HTTP/1.1 request on its own socket, so the test controls the disconnect."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: t\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def wait_until(predicate, timeout_s: float, poll_s: float = 0.002) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(poll_s)
    raise AssertionError(f"condition not met within {timeout_s}s")


BODIES = {
    "generate-stream": ("/generate", b'{"text": "Write forever", "stream": true, '
                        b'"sampling_params": {"max_new_tokens": %d, "ignore_eos": true}}'),
    "generate": ("/generate", b'{"text": "Write forever", '
                 b'"sampling_params": {"max_new_tokens": %d, "ignore_eos": true}}'),
    "chat-stream": ("/v1/chat/completions",
                    b'{"model": "m", "stream": true, "max_tokens": %d, "ignore_eos": true, '
                    b'"messages": [{"role": "user", "content": "Write forever"}]}'),
    "chat": ("/v1/chat/completions",
             b'{"model": "m", "max_tokens": %d, "ignore_eos": true, '
             b'"messages": [{"role": "user", "content": "Write forever"}]}'),
    "completions-stream": ("/v1/completions",
                           b'{"model": "m", "prompt": ["a", "b"], "stream": true, '
                           b'"max_tokens": %d, "ignore_eos": true}'),
}


@pytest.mark.parametrize("kind", list(BODIES))
def test_disconnect_aborts_the_engine_request_within_100ms(server, kind):
    path, template = BODIES[kind]
    idle = engine_stats(server)
    assert idle.running == 0 and idle.queue_len == 0
    sock = raw_post(server, path, template % LONG)
    wait_until(lambda: engine_stats(server).running >= 1, 10)
    if "stream" in kind:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # it is streaming
    time.sleep(0.05)  # a few tokens in
    cache = server.app.state.runtime.engines[0].cache
    # KV beyond the shared cache tree belongs to running requests.
    assert engine_stats(server).kv_used_tokens > cache.total_size()
    sock.close()
    try:
        elapsed = wait_until(lambda: engine_stats(server).running == 0, 2)
    finally:
        server.call(server.app.state.runtime.engines[0].flush_cache())
    assert elapsed < 0.1, f"abort took {elapsed * 1000:.0f} ms"
    after = engine_stats(server)
    assert after.queue_len == 0
    assert after.kv_used_tokens == cache.total_size()  # no request holds KV any more
    assert cache.protected_size() == 0  # and nothing in the tree is locked
    assert not server.app.state.runtime.requests.by_rid  # no rid left registered
