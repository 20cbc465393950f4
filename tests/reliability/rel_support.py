"""Helpers of the reliability tests: real server processes that can be killed (SIGKILL)
and restarted on the same port, and polling with a deadline."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


class ServerProcess:
    """A `progserve serve` subprocess on a fixed loopback port: `kill()` is a SIGKILL (no
    goodbye to its clients), `start()` brings it back on the same port."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None) -> None:
        self.flags = flags
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()  # a file, never a pipe that could fill up
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        return self.launch().wait_healthy(timeout_s)

    def launch(self) -> ServerProcess:
        """Start the process without waiting (start several, then `wait_healthy` each)."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "progserve.cli", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), *self.flags],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def wait_healthy(self, timeout_s: float = 60.0) -> ServerProcess:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"progserve exited with {self.proc.returncode}:\n"
                                   f"{self.output()}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"progserve on port {self.port} not healthy after {timeout_s} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
