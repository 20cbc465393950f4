"""The native program API over real HTTP: submit a graph, wait for and stream
variables, grow the program, end and cancel it; problem-JSON errors."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime

SCRIPT = Path(__file__).parents[1] / "fixtures" / "sim_script.json"


@pytest.fixture(scope="module")
def server(serve_in_thread):
    return serve_in_thread(create_app(ServerRuntime(Settings(
        sim={"time_scale": 0.02, "script_file": SCRIPT}))))


@pytest.fixture(scope="module")
def slow_server(serve_in_thread):
    return serve_in_thread(create_app(ServerRuntime(Settings(sim={"time_scale": 1.0}))))


def _graph(program_id: str) -> dict:
    return {
        "program_id": program_id,
        "inputs": {"city": "France"},
        "calls": [
            {"id": "ask", "prompt": "The capital of {{city}} is", "output": "capital",
             "sampling": {"max_new_tokens": 32}},
            {"id": "add", "kind": "tool", "tool": "calculator",
             "args": {"expression": "(2 + 3) * 4"}, "output": "sum"},
            {"id": "echo", "prompt": "Repeat:{{capital}} / {{sum}}", "output": "final",
             "sampling": {"max_new_tokens": 4}},
        ],
    }


def test_submit_wait_and_state(server):
    resp = httpx.post(server.url + "/v1/programs", json=_graph("graph-1"))
    assert resp.status_code == 201
    assert resp.json() == {"program_id": "graph-1"}
    assert resp.headers["location"] == "/v1/programs/graph-1"

    capital = httpx.get(server.url + "/v1/programs/graph-1/variables/capital",
                        params={"timeout": 10}).json()
    assert capital == {"program_id": "graph-1", "name": "capital",
                       "value": " Paris, a city on the Seine."}
    assert httpx.get(server.url + "/v1/programs/graph-1/variables/sum",
                     params={"timeout": 10}).json()["value"] == "20"
    final = httpx.get(server.url + "/v1/programs/graph-1/variables/final", timeout=30).json()
    assert final["value"]

    state = httpx.get(server.url + "/v1/programs/graph-1").json()
    calls = {c["id"]: c for c in state["calls"]}
    assert set(calls) == {"ask", "add", "echo"}
    assert all(c["status"] == "finished" for c in calls.values())
    assert calls["echo"]["kind"] == "llm" and calls["add"]["kind"] == "tool"
    assert state["variables"]["capital"] == capital["value"]
    listed = httpx.get(server.url + "/v1/programs").json()["data"]
    assert "graph-1" in {p["id"] for p in listed}


def test_stream_a_variable(slow_server):
    server = slow_server
    spec = {"calls": [{"id": "long", "prompt": "Tell a story", "output": "story",
                       "sampling": {"max_new_tokens": 60, "ignore_eos": True}}]}
    program_id = httpx.post(server.url + "/v1/programs", json=spec).json()["program_id"]
    deltas = []
    with httpx.stream("GET", f"{server.url}/v1/programs/{program_id}/variables/story",
                      params={"stream": "true"}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data:"):
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                deltas.append(json.loads(payload)["delta"])
    whole = httpx.get(f"{server.url}/v1/programs/{program_id}/variables/story").json()["value"]
    assert len(deltas) > 1 and "".join(deltas) == whole


def test_add_calls_grows_the_program_then_end(server):
    spec = {"program_id": "dyn-1", "calls": [
        {"id": "a", "prompt": "The capital of France is", "output": "a",
         "sampling": {"max_new_tokens": 32}}]}
    assert httpx.post(server.url + "/v1/programs", json=spec).status_code == 201
    resp = httpx.post(server.url + "/v1/programs/dyn-1/calls", json={"calls": [
        {"id": "b", "prompt": "Q: Is the sky blue? A: ", "output": "b",
         "sampling": {"max_new_tokens": 32}, "parents": ["a"]}]})
    assert resp.status_code == 200 and resp.json()["added"] == ["b"]
    value = httpx.get(server.url + "/v1/programs/dyn-1/variables/b", timeout=30).json()["value"]
    assert value == "yes, on a clear day."
    assert httpx.post(server.url + "/v1/programs/dyn-1/end").json()["status"] == "ended"
    assert httpx.get(server.url + "/v1/programs/dyn-1").json()["status"] == "finished"


def test_wait_timeout_is_408(slow_server):
    spec = {"calls": [{"id": "slow", "prompt": "x", "output": "v",
                       "sampling": {"max_new_tokens": 3000, "ignore_eos": True}}]}
    pid = httpx.post(slow_server.url + "/v1/programs", json=spec).json()["program_id"]
    resp = httpx.get(f"{slow_server.url}/v1/programs/{pid}/variables/v",
                     params={"timeout": 0.2})
    assert resp.status_code == 408
    assert resp.headers["content-type"] == "application/problem+json"
    assert httpx.delete(f"{slow_server.url}/v1/programs/{pid}").status_code == 200


def test_cancel_stops_in_flight_calls(slow_server):
    spec = {"program_id": "to-cancel", "calls": [
        {"id": "slow", "prompt": "Write forever", "output": "v",
         "sampling": {"max_new_tokens": 4000, "ignore_eos": True}}]}
    httpx.post(slow_server.url + "/v1/programs", json=spec)
    with httpx.stream("GET", slow_server.url + "/v1/programs/to-cancel/variables/v",
                      params={"stream": "true"}) as resp:
        lines = resp.iter_lines()
        next(line for line in lines if line.startswith("data:"))  # it is running
        resp_del = httpx.delete(slow_server.url + "/v1/programs/to-cancel")
        assert resp_del.json() == {"program_id": "to-cancel", "status": "cancelled"}
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]"
    assert any('"error"' in line for line in rest)  # the stream says why it stopped
    state = httpx.get(slow_server.url + "/v1/programs/to-cancel").json()
    assert state["status"] == "cancelled"
    assert state["calls"][0]["status"] == "cancelled"
    stats = slow_server.call(slow_server.app.state.runtime.engines[0].stats())
    assert stats.running == 0 and stats.queue_len == 0


@pytest.mark.parametrize("method,path,body,status", [
    ("GET", "/v1/programs/nope", None, 404),
    ("GET", "/v1/programs/nope/variables/x", None, 404),
    ("DELETE", "/v1/programs/nope", None, 404),
    ("POST", "/v1/programs/nope/end", None, 404),
    ("POST", "/v1/programs/nope/calls", {"calls": [{"id": "a", "prompt": "x"}]}, 404),
    ("POST", "/v1/programs", {"calls": [{"id": "a"}]}, 400),  # no prompt
    ("POST", "/v1/programs", {"calls": [{"id": "a", "prompt": "{{a_out}}", "output": "a_out"}]},
     400),  # a cycle through its own output
    ("POST", "/v1/programs", {"calls": [{"id": "a", "prompt": "{{missing}}"}]}, 400),
    ("POST", "/v1/programs", {"calls": [{"id": "a", "kind": "tool", "tool": "rm -rf"}]}, 400),
    ("POST", "/v1/programs", {"program_id": "bad id!"}, 400),
    ("POST", "/v1/programs", {"nope": 1}, 400),
    ("POST", "/v1/programs/graph-x/calls", {"calls": []}, 400),
    ("GET", "/v1/programs/graph-x/variables/v?timeout=-1", None, 400),
])
def test_errors_are_problem_json(server, method, path, body, status):
    resp = httpx.request(method, server.url + path, json=body)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    problem = resp.json()
    assert problem["status"] == status
    assert problem["title"] and problem["detail"] and problem["type"].startswith("https://")


def test_duplicate_program_id_is_rejected(server):
    spec = {"program_id": "dup-prog", "calls": []}
    assert httpx.post(server.url + "/v1/programs", json=spec).status_code == 201
    assert httpx.post(server.url + "/v1/programs", json=spec).status_code == 409  # conflict


def test_openapi_documents_bodies_and_error_shapes(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    post = schema["paths"]["/v1/programs"]["post"]
    body_schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert "calls" in body_schema["properties"]
    assert "CallSpec" in schema["components"]["schemas"]
    assert "4XX" in post["responses"]
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert chat["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "OpenAIError")
