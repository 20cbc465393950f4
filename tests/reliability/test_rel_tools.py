"""A tool that crashes or hangs: that call fails with a clear error (502, naming the tool,
the call and why; a hang is cut at the tool's timeout), the rest of the
program and the server carry on, and a DSL program can catch the failure and recover."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from frontend_lang import CallFailedError, gen, program, tool
from frontend_lang.runtime_remote import RemoteRuntime
from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime
from scheduler.tools.builtin import register_builtin_tools
from scheduler.tools.executor import ToolExecutor
from scheduler.tools.registry import ToolRegistry

HANG_TIMEOUT_S = 0.5


def crash(query: str) -> str:
    raise RuntimeError(f"search backend exploded on {len(query)} chars")


def hang(query: str) -> str:
    threading.Event().wait(30)  # a stuck sync tool: blocks its worker thread
    return "too late"


async def hang_async(query: str) -> str:
    import asyncio

    await asyncio.sleep(30)
    return "too late"


@pytest.fixture(scope="module")
def server(serve_in_thread):
    registry = register_builtin_tools(ToolRegistry())
    registry.register("crash", crash, max_retries=0)
    registry.register("hang", hang, timeout_s=HANG_TIMEOUT_S, max_retries=0)
    registry.register("hang_async", hang_async, timeout_s=HANG_TIMEOUT_S, max_retries=0)
    runtime = ServerRuntime(Settings(sim={"time_scale": 0.05}), tools=ToolExecutor(registry))
    return serve_in_thread(create_app(runtime))


def submit(url: str, calls: list[dict]) -> str:
    resp = httpx.post(url + "/v1/programs", json={"calls": calls}, timeout=30)
    assert resp.status_code == 201, resp.text
    return resp.json()["program_id"]


def tool_call(call_id: str, name: str, output: str) -> dict:
    return {"id": call_id, "kind": "tool", "tool": name, "args": {"query": "q"},
            "output": output}


@pytest.mark.parametrize("name, status, words", [
    ("crash", 502, ["tool 'crash'", "exploded"]),
    ("hang", 502, ["tool 'hang'", "timed out"]),
    ("hang_async", 502, ["tool 'hang_async'", "timed out"]),
])
def test_a_broken_tool_fails_only_its_call_with_a_clear_error(server, name, status, words):
    started = time.monotonic()
    pid = submit(server.url, [
        tool_call("t", name, "found"),
        {"id": "uses", "prompt": "Use {{found}}", "output": "answer",
         "sampling": {"max_new_tokens": 4}},
        {"id": "other", "prompt": "Independent work", "output": "other",
         "sampling": {"max_new_tokens": 4}},
    ])
    base = f"{server.url}/v1/programs/{pid}/variables"
    failed = httpx.get(f"{base}/found", params={"timeout": 20}, timeout=30)
    elapsed = time.monotonic() - started
    assert failed.status_code == status, failed.text
    problem = failed.json()
    assert failed.headers["content-type"].startswith("application/problem+json")
    assert problem["call_id"] == "t" and problem["variable"] == "found"
    for word in words:
        assert word in problem["detail"].lower(), problem["detail"]
    if name.startswith("hang"):
        assert elapsed < HANG_TIMEOUT_S + 3  # cut at its timeout, not after 30 s
    # Its dependant fails with it (naming the root cause); independent work completes.
    dependant = httpx.get(f"{base}/answer", params={"timeout": 20}, timeout=30)
    assert dependant.status_code == status and "'t'" in dependant.json()["detail"]
    other = httpx.get(f"{base}/other", params={"timeout": 20}, timeout=30)
    assert other.status_code == 200 and other.json()["value"]
    state = httpx.get(f"{server.url}/v1/programs/{pid}", timeout=10).json()
    statuses = {c["id"]: c["status"] for c in state["calls"]}
    assert statuses == {"t": "failed", "uses": "failed", "other": "finished"}
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


@program
async def search_with_fallback(question: str) -> dict[str, str]:
    """An agent that survives its search tool failing: it falls back to another tool."""
    try:
        found = await tool("crash", query=question)
        source = "search"
    except CallFailedError as exc:
        assert "exploded" in str(exc)
        found = await tool("calculator", expression="6 * 7")
        source = "fallback"
    answer = gen(f"Question: {question} Evidence: {found} Answer:", max_tokens=6)
    return {"source": source, "found": found, "answer": await answer}


async def test_a_program_catches_the_failure_and_recovers(server):
    async with RemoteRuntime(server.url) as runtime:
        result = await search_with_fallback.run(runtime, "what is six times seven?")
    assert result.value["source"] == "fallback"
    assert result.value["found"] == "42"
    assert result.value["answer"]
