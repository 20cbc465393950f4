"""Fixtures of the DSL tests: embedded runtimes on the sim engine, and a real progserve
server (uvicorn on a free loopback port) for the remote runtime."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from frontend_lang.cli_support import embedded_settings, free_port
from frontend_lang.runtime_local import LocalRuntime, builtin_tool_registry
from progserve.app import create_app
from progserve.auth import hash_key
from progserve.runtime import ServerRuntime
from scheduler.tools.executor import ToolExecutor

REPO = Path(__file__).resolve().parents[2]
# The sim engine imitates an 8B model on an H100 in real time; tests run it 10x faster.
TIME_SCALE = 0.1

MakeRuntime = Callable[..., Awaitable[LocalRuntime]]


@pytest.fixture
async def make_local(tmp_path: Path) -> AsyncIterator[MakeRuntime]:
    """`await make_local(script_rules, **sim_options)` -> a started LocalRuntime."""
    runtimes: list[LocalRuntime] = []

    async def make(script: list[dict[str, str]] = (), **sim: Any) -> LocalRuntime:  # type: ignore[assignment]
        workdir = tmp_path / f"runtime{len(runtimes)}"
        workdir.mkdir()
        settings = embedded_settings("sim", list(script), workdir, TIME_SCALE)
        if sim:
            settings.sim = settings.sim.model_copy(update=sim)
        runtime = LocalRuntime(settings, docs_root=REPO / "docs")
        runtimes.append(runtime)
        return await runtime.start()

    yield make
    for runtime in runtimes:
        await runtime.close()


@pytest.fixture
async def progserve_url(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """`await progserve_url(script_rules)` -> the URL of a real progserve server (sim engine,
    builtin tools) running in this event loop."""
    servers: list[tuple[uvicorn.Server, asyncio.Task[None], ToolExecutor]] = []

    async def start(
        script: list[dict[str, str]] = (),  # type: ignore[assignment]
        api_keys: dict[str, str] | None = None,
        limits: dict[str, Any] | None = None,
    ) -> str:
        workdir = tmp_path / f"server{len(servers)}"
        workdir.mkdir()
        settings = embedded_settings("sim", list(script), workdir, TIME_SCALE)
        if limits:
            settings.limits = settings.limits.model_copy(update=limits)
        if api_keys:  # key -> tenant
            keys_file = workdir / "keys.json"
            keys_file.write_text(json.dumps({hash_key(k): t for k, t in api_keys.items()}))
            settings.api_keys = keys_file
        tools = ToolExecutor(builtin_tool_registry(REPO / "docs"))
        app = create_app(ServerRuntime(settings, tools=tools))
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
        task = asyncio.create_task(server.serve())
        servers.append((server, task, tools))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, task, tools in servers:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        await tools.aclose()
