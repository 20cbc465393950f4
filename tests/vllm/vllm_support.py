"""Helpers of the vLLM test package: where vLLM is installed, server processes, marks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"
START_TIMEOUT_S = float(os.environ.get("PROGSERVE_VLLM_START_TIMEOUT_S", "900"))

# What each test module here marks itself with: a real engine is slow, and the first test
# also waits for vLLM to start (the suite's default limit is 300 s).
VLLM_MARKS = [pytest.mark.slow, pytest.mark.timeout(1200)]


def vllm_python() -> Path:
    venv = Path(os.environ.get("PROGSERVE_VLLM_VENV") or REPO / ".vllm-venv")
    return venv / "bin" / "python"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout_s: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status
    except OSError:
        return 0


@dataclass
class RunningServer:
    """A vLLM server this package did not start (`PROGSERVE_VLLM_URL`)."""

    url: str


class Process:
    """A server process in its own session (so its children stop with it), logging to a
    file, stopped with SIGTERM then SIGKILL to the whole group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int,
                 health: str):
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.health = health
        ARTIFACTS.mkdir(exist_ok=True)
        self.log_path = ARTIFACTS / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=REPO)

    def output(self, tail: int = 6000) -> str:
        return self.log_path.read_bytes()[-tail:].decode(errors="replace")

    def wait_ready(self, timeout_s: float) -> Process:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   f"{self.output()}")
            if _get(self.url + self.health) == 200:
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._log.close()
