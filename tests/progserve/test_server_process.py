"""The one server harness (`progserve/bench/server_process.py`) that the benches and the
tests start `progserve serve` with: ready when /health answers, restartable on its port
after a SIGKILL, and a process that dies at start-up is reported with its output."""

from __future__ import annotations

import sys
import urllib.request

import pytest

from progserve.bench.server_process import ServerProcess, free_port, progserve_process


def test_a_killed_server_comes_back_on_the_same_port() -> None:
    server = progserve_process("--engine", "sim", "--log-level", "warning")
    try:
        server.start()
        port = server.port
        server.kill()
        assert not server.healthy()
        server.start()
        assert server.port == port
        with urllib.request.urlopen(server.url + "/health", timeout=5) as resp:
            assert resp.status == 200
    finally:
        server.close()
    assert server.proc is not None and server.proc.poll() is not None


def test_a_server_that_exits_at_start_up_is_reported_with_its_output() -> None:
    command = [sys.executable, "-c", "import sys; print('no such engine'); sys.exit(3)"]
    server = ServerProcess(command, port=free_port(), name="broken")
    with pytest.raises(RuntimeError, match=r"(?s)broken exited with 3:.*no such engine"):
        server.start(timeout_s=30)
    server.close()
