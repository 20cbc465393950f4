"""A client that disconnects mid-stream, through a two-level deployment: client ->
progserve (`--engine sglang`) -> progserve-sim. The engine request at the far end is
aborted within 100 ms and its KV unlocked; nothing stays registered at either level."""

from __future__ import annotations

import socket
import time

import pytest
from rel_support import wait_until

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime

LONG = 4000  # tokens: tens of seconds at real-time sim speed


@pytest.fixture(scope="module")
def chain(serve_in_thread):
    backend = serve_in_thread(create_app(ServerRuntime(Settings(sim={"time_scale": 1.0}))))
    front = serve_in_thread(create_app(ServerRuntime(Settings(engine="sglang",
                                                        engine_url=[backend.url]))))
    return front, backend


def stats(server):
    return server.call(server.app.state.runtime.engines[0].stats())


def raw_post(port: int, path: str, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: t\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


BODIES = {
    "sglang-stream": ("/generate", b'{"text": "Write forever", "stream": true, '
                      b'"sampling_params": {"max_new_tokens": %d, "ignore_eos": true}}'),
    "chat-stream": ("/v1/chat/completions",
                    b'{"model": "m", "stream": true, "max_tokens": %d, "ignore_eos": true, '
                    b'"messages": [{"role": "user", "content": "Write forever"}]}'),
    "chat": ("/v1/chat/completions",
             b'{"model": "m", "max_tokens": %d, "ignore_eos": true, '
             b'"messages": [{"role": "user", "content": "Write forever"}]}'),
}


@pytest.mark.parametrize("kind", list(BODIES))
def test_disconnect_aborts_the_far_engine_request_within_100ms(chain, kind):
    front, backend = chain
    cache = backend.app.state.runtime.engines[0].cache
    assert stats(backend).running == 0
    path, template = BODIES[kind]
    sock = raw_post(front.port, path, template % LONG)
    wait_until(lambda: stats(backend).running == 1, 10)
    if "stream" in kind:
        head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head
    time.sleep(0.05)
    # KV beyond the shared cache tree belongs to the running request.
    assert stats(backend).kv_used_tokens > cache.total_size()
    sock.close()
    elapsed = wait_until(lambda: stats(backend).running == 0, 2, poll_s=0.002)
    assert elapsed < 0.1, f"the far end aborted after {elapsed * 1000:.0f} ms"
    after = stats(backend)
    assert after.queue_len == 0
    assert after.kv_used_tokens == cache.total_size()  # no request holds KV any more
    assert cache.protected_size() == 0  # and nothing in the tree is locked
    # Nothing is left in flight at either level.
    for server in (front, backend):
        wait_until(lambda s=server: not s.app.state.runtime.requests.by_rid, 1)
        scheduler = server.app.state.runtime.scheduler
        wait_until(lambda s=scheduler: all(r.inflight_requests == 0 for r in s.replicas), 1)
