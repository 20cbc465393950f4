"""Shared pieces of the observability tests: a map-reduce program, a real progserve server
(uvicorn on a free loopback port, sim engine, builtin tools) in the test's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from progserve.app import create_app
from progserve.bench.server_process import free_port
from progserve.config import Settings, load_settings
from progserve.runtime import ServerRuntime
from scheduler.tools.builtin import register_builtin_tools
from scheduler.tools.executor import ToolExecutor
from scheduler.tools.registry import ToolRegistry

REPO = Path(__file__).resolve().parents[2]
SYSTEM = (
    "You are a careful technical summariser. Read the part of the document below and "
    "write one short sentence that keeps its main claim and its key numbers. "
) * 3


def mapreduce_spec(n: int = 4, *, with_tool: bool = True) -> dict[str, Any]:
    """Parrot-style map-reduce: n parallel summaries (sharing a system prefix), a document
    search on the first summary (a tool node), and a reduce over all of them."""
    calls: list[dict[str, Any]] = [
        {
            "id": f"map-{i}",
            "prompt": SYSTEM + f"Part {i}: {{{{chunk_{i}}}}}\nSummary:",
            "output": f"s{i}",
            "sampling": {"max_new_tokens": 16 + 4 * i, "temperature": 0},
        }
        for i in range(n)
    ]
    refs = " ".join(f"{{{{s{i}}}}}" for i in range(n))
    if with_tool:
        calls.append(
            {
                "id": "search",
                "kind": "tool",
                "tool": "search_docs",
                "args": {"query": "{{s0}}"},
                "output": "hits",
            }
        )
        refs += " Related: {{hits}}"
    calls.append(
        {
            "id": "reduce",
            "prompt": SYSTEM + refs + "\nSummary of the whole document:",
            "output": "final",
            "sampling": {"max_new_tokens": 24, "temperature": 0},
        }
    )
    inputs = {f"chunk_{i}": f"chunk {i} talks about scheduling step {i}. " * 8 for i in range(n)}
    return {"inputs": inputs, "calls": calls}


def sim_settings(**overrides: Any) -> Settings:
    """Sim engine at 10x real time, two replicas."""
    base: dict[str, Any] = {"engine": "sim", "replicas": 2, "sim": {"time_scale": 0.1}}
    base.update(overrides)
    return load_settings(**base)


@dataclass
class LiveServer:
    url: str
    app: FastAPI
    runtime: ServerRuntime


@asynccontextmanager
async def live_server(settings: Settings) -> AsyncIterator[LiveServer]:
    """A real progserve server in this event loop: uvicorn on a free port."""
    tools = ToolExecutor(register_builtin_tools(ToolRegistry(), docs_root=REPO / "docs"))
    runtime = ServerRuntime(settings, tools=tools)
    app = create_app(runtime)  # installs tracing, /metrics and /ui
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield LiveServer(f"http://127.0.0.1:{port}", app, runtime)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        await tools.aclose()


async def run_program(
    client: httpx.AsyncClient, spec: dict[str, Any], *, headers: dict[str, str] | None = None
) -> str:
    """Submit a program, wait for its `final` variable, end it; returns its id."""
    r = await client.post("/v1/programs", json=spec, headers=headers or {})
    assert r.status_code == 201, r.text
    program_id = r.json()["program_id"]
    r = await client.get(f"/v1/programs/{program_id}/variables/final", headers=headers or {})
    assert r.status_code == 200, r.text
    r = await client.post(f"/v1/programs/{program_id}/end", headers=headers or {})
    assert r.status_code < 300, r.text
    return program_id
