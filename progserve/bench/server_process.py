"""A server in a subprocess on a loopback port: the one harness the benches and the tests
use to start `progserve serve` (or another HTTP server, such as LiteLLM's proxy), wait
until it answers its health route, and stop it.

- `progserve_process(*flags, env=...)`: `progserve serve --host 127.0.0.1 --port <free>
  <flags>` run by this interpreter, so it imports the same packages as the caller
  (`PYTHONPATH` included). The start-up engine probe is off unless asked for: its
  requests would reach the engine alongside the caller's own.
- `ServerProcess.start()` = `launch()` then `wait_healthy()`; launch several first to
  start them side by side. `stop()` sends SIGTERM (uvicorn's graceful shutdown) and
  kills after a grace period; `kill()` is a SIGKILL (no goodbye to its clients), and
  `start()` brings the server back on the same port.
- Output goes to a file (`log=`, else an anonymous temporary file), never to a pipe that
  could fill up and block the server; `output()` reads it back for error messages.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`command` as a subprocess serving HTTP on `port` (the command must bind it)."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        port: int,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        health_path: str = "/health",
        name: str = "server",
    ) -> None:
        self.command = list(command)
        self.port = port
        self.url = f"http://{LOOPBACK}:{port}"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.health_path = health_path
        self.name = name
        self.log_path = log
        self._log: IO[bytes] = log.open("wb") if log is not None else tempfile.TemporaryFile()
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------- lifecycle

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        return self.launch().wait_healthy(timeout_s)

    def launch(self) -> ServerProcess:
        """Start the process without waiting (start several, then `wait_healthy` each)."""
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        return self

    def wait_healthy(self, timeout_s: float = 60.0) -> ServerProcess:
        """Poll the health route until it answers 2xx; RuntimeError (with the server's
        output) if the process exits or `timeout_s` passes, and then it is stopped."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.output()[-4000:]}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} on port {self.port} not healthy after {timeout_s} s:"
                           f"\n{self.output()[-4000:]}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.health_path, timeout=1) as resp:
                return 200 <= resp.status < 300
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: the process dies without closing its connections."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited after `grace_s`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def close(self) -> None:
        """Stop it and close its output file."""
        self.stop()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------- output

    def output(self) -> str:
        """Everything the process wrote so far (stdout and stderr)."""
        self._log.flush()
        if self.log_path is not None:
            return self.log_path.read_text(errors="replace")
        self._log.seek(0)
        return self._log.read().decode(errors="replace")


def progserve_command(port: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "progserve.cli", "serve", "--host", LOOPBACK,
            "--port", str(port), *flags]


def progserve_process(
    *flags: str,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    port: int | None = None,
    startup_probe: bool = False,
    name: str = "progserve",
) -> ServerProcess:
    """`progserve serve <flags>` on a free port (not started: call `start()`)."""
    port = port if port is not None else free_port()
    probe = {} if startup_probe else {"PROGSERVE_STARTUP_PROBE": "false"}
    return ServerProcess(progserve_command(port, *flags), port=port, env={**probe, **(env or {})},
                         log=log, name=name)
