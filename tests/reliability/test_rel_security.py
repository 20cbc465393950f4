"""Security properties beyond tenants: tools come from the server's allowlist only (a
request names a registered tool or gets a 400; nothing it sends is ever evaluated), the
code runner is sandboxed (empty environment, no write access to the server's files when
run as root, killed at its time limit), and prompts and outputs stay out of the logs
unless debug logging is on."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import httpx
import pytest

from progserve.app import create_app
from progserve.bench.server_process import progserve_process
from progserve.config import Settings
from progserve.runtime import ServerRuntime
from scheduler.tools.builtin import register_builtin_tools
from scheduler.tools.config import CodeRunnerConfig, ToolsConfig
from scheduler.tools.executor import ToolExecutor
from scheduler.tools.registry import ToolRegistry

SECRET = "zq-SECRET-MARKER-4417"


@pytest.fixture(scope="module")
def server(serve_in_thread):
    config = ToolsConfig(code_runner=CodeRunnerConfig(timeout_s=2.0, cpu_s=2))
    registry = register_builtin_tools(ToolRegistry(config), code_runner=True)
    runtime = ServerRuntime(Settings(sim={"time_scale": 0.01}), tools=ToolExecutor(registry))
    return serve_in_thread(create_app(runtime))


def run_tool(url: str, tool: str, args: dict) -> httpx.Response:
    spec = {"calls": [{"id": "t", "kind": "tool", "tool": tool, "args": args, "output": "out"}]}
    resp = httpx.post(url + "/v1/programs", json=spec, timeout=30)
    if resp.status_code != 201:
        return resp
    pid = resp.json()["program_id"]
    return httpx.get(f"{url}/v1/programs/{pid}/variables/out", params={"timeout": 30},
                     timeout=40)


@pytest.mark.parametrize("name", ["os.system", "eval", "__import__", "calculator; rm -rf /",
                                  "../python", "Python"])
def test_only_registered_tools_can_be_called(server, name):
    resp = run_tool(server.url, name, {"code": "print(1)", "expression": "1"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["code"] == "unknown_tool"


def test_the_calculator_never_evaluates_code(server):
    resp = run_tool(server.url, "calculator",
                    {"expression": "__import__('os').system('touch /tmp/pwned')"})
    assert resp.status_code in (400, 502), resp.text  # refused, and nothing ran
    assert not os.path.exists("/tmp/pwned")


def code_result(server, code: str) -> dict:
    resp = run_tool(server.url, "python", {"code": code})
    assert resp.status_code == 200, resp.text
    return json.loads(resp.json()["value"])


def test_code_runner_sees_no_server_environment(server, monkeypatch):
    monkeypatch.setenv("PROGSERVE_REL_SECRET", SECRET)  # the server process has it
    result = code_result(server, "import os\nprint(sorted(os.environ))")
    assert result["ok"], result
    assert SECRET not in result["stdout"] and "PROGSERVE_REL_SECRET" not in result["stdout"]


@pytest.mark.skipif(os.geteuid() != 0, reason="privileges are dropped only under root")
def test_code_runner_cannot_write_the_servers_files(server, tmp_path):
    target = tmp_path / "owned-by-root.txt"
    target.write_text("original")
    target.chmod(0o644)
    result = code_result(server, f"open({str(target)!r}, 'w').write('pwned')")
    assert not result["ok"] and "PermissionError" in (result["error"] or ""), result
    assert target.read_text() == "original"


def test_code_runner_is_killed_at_its_limit(server):
    result = code_result(server, "while True:\n    pass")
    assert not result["ok"] and result["timed_out"], result


# ----------------------------------------------------------------------------- logs


def exercise(url: str) -> None:
    """Prompts and outputs carrying the secret through every entrance, including errors."""
    chat = {"model": "m", "max_tokens": 8,
            "messages": [{"role": "user", "content": f"Repeat: {SECRET}"}]}
    assert httpx.post(url + "/v1/chat/completions", json=chat, timeout=30).status_code == 200
    chat_stream = {**chat, "stream": True}
    assert httpx.post(url + "/v1/chat/completions", json=chat_stream,
                      timeout=30).status_code == 200
    gen = {"text": f"Say {SECRET}", "sampling_params": {"max_new_tokens": 4}}
    assert httpx.post(url + "/generate", json=gen, timeout=30).status_code == 200
    spec = {"inputs": {"q": SECRET}, "calls": [
        {"id": "a", "prompt": "Answer {{q}}", "output": "ans", "sampling": {"max_new_tokens": 4}},
        {"id": "t", "kind": "tool", "tool": "calculator", "args": {"expression": SECRET},
         "output": "calc"}]}
    pid = httpx.post(url + "/v1/programs", json=spec, timeout=30).json()["program_id"]
    httpx.get(f"{url}/v1/programs/{pid}/variables/ans", params={"timeout": 20}, timeout=30)
    failed = httpx.get(f"{url}/v1/programs/{pid}/variables/calc", params={"timeout": 20},
                       timeout=30)
    assert failed.status_code >= 400  # a failing tool whose argument is the secret
    # Bad requests whose bodies carry the secret.
    for bad in ({"text": SECRET, "sampling_params": {"max_new_tokens": -1}},
                {"text": SECRET, "sampling_params": {"temperature": SECRET}}):
        assert httpx.post(url + "/generate", json=bad, timeout=30).status_code == 400
    assert httpx.post(url + "/v1/programs", content=SECRET.encode(),
                      timeout=30).status_code == 400


def test_prompts_stay_out_of_in_process_logs(server, caplog):
    caplog.set_level(logging.INFO)  # everything the server logs at its default level
    exercise(server.url)
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert SECRET not in logged


def test_prompts_stay_out_of_a_servers_output():
    """The real process, access log on, at the default log level: the secret is nowhere
    in what it writes."""
    proc = progserve_process("--log-level", "info", "--access-log",
                             env={"PROGSERVE_SIM__TIME_SCALE": "0.01"}).start()
    try:
        exercise(proc.url)
    finally:
        proc.stop()
    output = proc.output()
    assert "GET /v1/programs" in output or "POST /v1/programs" in output  # it did log
    assert SECRET not in output


def test_the_hash_tool_prints_only_the_digest():
    out = subprocess.run([sys.executable, "-m", "progserve.auth", SECRET], capture_output=True,
                         text=True, check=True).stdout
    assert SECRET not in out and len(out.strip()) == 64
