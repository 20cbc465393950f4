"""Helpers of the reliability tests: a client that leaves mid-request, and polling with a
deadline. Server processes that can be killed (SIGKILL) and restarted on the same port are
the shared harness, `progserve.bench.server_process`."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any


def raw_post(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a JSON POST on a raw socket and return it unread: closing it is a client that
    leaves (mid-request, or before the answer starts)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: t\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def wait_until(predicate: Callable[[], Any], timeout_s: float, poll_s: float = 0.01) -> float:
    """Seconds until `predicate()` was true; AssertionError after `timeout_s`."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(poll_s)
