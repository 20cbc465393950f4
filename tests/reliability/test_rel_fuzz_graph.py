"""Fuzzing the DSL's graph submission (`POST /v1/programs`, `POST .../calls`): cycles,
deep and wide graphs, huge prompts, invalid UTF-8, broken JSON and absurd sampling
parameters always get a 4xx in the documented problem shape, never a 5xx, and the
server stays healthy. Request size, graph size and max_tokens are capped by config."""

from __future__ import annotations

import json
import logging
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime

MAX_BYTES = 64 * 1024
MAX_PROMPT = 8_000
MAX_TOKENS = 256
MAX_CALLS = 200


@pytest.fixture(scope="module")
def server(serve_in_thread):
    settings_ = Settings(
        sim={"time_scale": 0.0001},
        limits={"max_request_bytes": MAX_BYTES, "max_prompt_chars": MAX_PROMPT,
                "max_tokens": MAX_TOKENS},
        scheduler={"max_calls_per_program": MAX_CALLS},
    )
    return serve_in_thread(create_app(ServerRuntime(settings_)))


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def check_answer(resp: httpx.Response) -> None:
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        assert resp.headers["content-type"].startswith("application/problem+json")
        body = resp.json()
        assert body["status"] == resp.status_code and body["detail"], body


def cleanup(client: httpx.Client, resp: httpx.Response) -> None:
    if resp.status_code == 201:  # accepted: it must be a real, working program
        pid = resp.json()["program_id"]
        assert client.get(f"/v1/programs/{pid}").status_code == 200
        assert client.delete(f"/v1/programs/{pid}").status_code == 200


# ------------------------------------------------------------------------- strategies

NAMES = st.one_of(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), st.text(max_size=8))
ABSURD_NUMBER = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False), st.just(1e308), st.just(-1e308),
    st.text(max_size=5), st.none(), st.booleans(), st.lists(st.integers(), max_size=3))
SAMPLING_KEYS = ["max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "seed",
                 "n", "stop", "stop_token_ids", "regex", "json_schema", "ignore_eos", "bogus"]
SAMPLING = st.dictionaries(st.sampled_from(SAMPLING_KEYS), ABSURD_NUMBER, max_size=4)
PROMPT = st.one_of(
    st.text(max_size=60),
    st.builds(lambda n, c: c * n, st.integers(1, 3 * MAX_PROMPT), st.sampled_from("ab\u00e9\U0001f600")),
    st.builds(lambda a, b: f"{a} {{{{{b}}}}}", st.text(max_size=20), NAMES))


@st.composite
def graphs(draw) -> dict:
    """A random call graph: references to earlier or *later* variables (cycles), missing
    ones, explicit parents, duplicate ids, tools that exist and that do not."""
    n = draw(st.integers(0, 12))
    ids = [draw(NAMES) for _ in range(n)]
    calls = []
    for call_id in ids:
        ref = draw(st.one_of(st.none(), st.sampled_from(ids) if ids else st.none(), NAMES))
        call: dict = {"id": call_id, "output": draw(st.one_of(st.none(), st.just(f"v_{call_id}"),
                                                              NAMES))}
        if draw(st.booleans()):
            call["prompt"] = draw(PROMPT) + (f" {{{{v_{ref}}}}}" if ref else "")
            call["sampling"] = draw(SAMPLING)
        else:
            call["kind"] = "tool"
            call["tool"] = draw(st.sampled_from(["calculator", "rm_rf", "", "os.system"]))
            call["args"] = {"expression": draw(st.one_of(st.just("1+2"), st.text(max_size=10)))}
        if draw(st.booleans()):
            call["parents"] = draw(st.lists(st.sampled_from(ids), max_size=3))
        call.update(draw(st.dictionaries(st.sampled_from(["thread_id", "priority_hint",
                                                          "latency_critical", "extra"]),
                                         ABSURD_NUMBER, max_size=2)))
        calls.append(call)
    spec: dict = {"calls": calls}
    if draw(st.booleans()):
        spec["inputs"] = draw(st.dictionaries(NAMES, st.text(max_size=30), max_size=3))
    if draw(st.booleans()):
        spec["program_id"] = draw(NAMES)
    return spec


def mangle(body: bytes, how: str, where: int) -> bytes:
    at = where % (len(body) + 1)
    if how == "invalid-utf8":
        return body[:at] + b"\xff\xfe\xc3\x28" + body[at:]
    if how == "truncate":
        return body[:at]
    if how == "lone-surrogate":
        return body.replace(b'"calls"', b'"\\ud800calls"', 1)
    return body


# ------------------------------------------------------------------------- tests


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True, database=None)
@given(spec=graphs(), how=st.sampled_from(["none", "none", "invalid-utf8", "truncate",
                                            "lone-surrogate"]),
       where=st.integers(0, 10**6))
def test_fuzzed_graph_submissions_get_4xx_never_5xx(client, spec, how, where):
    body = mangle(json.dumps(spec, ensure_ascii=False).encode("utf-8", "surrogatepass"),
                  how, where)
    resp = client.post("/v1/programs", content=body,
                       headers={"Content-Type": "application/json"})
    check_answer(resp)
    cleanup(client, resp)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True, database=None)
@given(spec=graphs())
def test_fuzzed_calls_added_to_a_live_program_get_4xx_never_5xx(client, spec):
    base = client.post("/v1/programs", json={"inputs": {"q": "x"}, "calls": []})
    assert base.status_code == 201, base.text
    pid = base.json()["program_id"]
    resp = client.post(f"/v1/programs/{pid}/calls", json={"calls": spec["calls"]})
    check_answer(resp)
    assert client.delete(f"/v1/programs/{pid}").status_code == 200


def chain(n: int, tokens: int = 1) -> dict:
    calls = [{"id": "c0", "prompt": "start", "output": "v0",
              "sampling": {"max_new_tokens": MAX_TOKENS, "ignore_eos": True}}]
    calls += [{"id": f"c{i}", "prompt": f"{{{{v{i - 1}}}}}", "output": f"v{i}",
               "sampling": {"max_new_tokens": tokens}} for i in range(1, n)]
    return {"calls": calls}


def test_limits_come_from_config(client):
    too_big = client.post("/v1/programs", content=b'{"calls": []' + b" " * MAX_BYTES + b"}",
                          headers={"Content-Type": "application/json"})
    assert too_big.status_code == 413
    check_answer(too_big)
    too_long = client.post("/v1/programs", json={"calls": [
        {"id": "a", "prompt": "x" * (MAX_PROMPT + 1)}]})
    assert too_long.status_code == 400 and "prompt" in too_long.json()["detail"]
    too_many_tokens = client.post("/v1/programs", json={"calls": [
        {"id": "a", "prompt": "x", "sampling": {"max_new_tokens": MAX_TOKENS + 1}}]})
    assert too_many_tokens.status_code == 400
    assert str(MAX_TOKENS) in too_many_tokens.json()["detail"]
    too_many_calls = client.post("/v1/programs", json=chain(MAX_CALLS + 1))
    assert too_many_calls.status_code == 400 and "limit" in too_many_calls.json()["detail"]
    deep = client.post("/v1/programs", content=b'{"calls": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                       headers={"Content-Type": "application/json"})
    check_answer(deep)
    assert deep.status_code == 400


def test_cancelling_a_deep_chain_is_fine(serve_in_thread, caplog):
    """Regression: ending a chain of thousands of calls recursed once per call and hit
    Python's recursion limit (a 500 and a program stuck half-cancelled)."""
    big = serve_in_thread(create_app(ServerRuntime(Settings(sim={"time_scale": 0.05}))))
    caplog.set_level(logging.ERROR)
    with httpx.Client(base_url=big.url, timeout=60) as c:
        resp = c.post("/v1/programs", json=chain(3000))
        assert resp.status_code == 201, resp.text
        pid = resp.json()["program_id"]
        cancelled = c.delete(f"/v1/programs/{pid}")
        assert cancelled.status_code == 200, cancelled.text
        state = c.get(f"/v1/programs/{pid}").json()
        assert state["status"] == "cancelled"
        # A call already running ends when its engine confirms the abort (a loaded
        # machine may have started the chain's first call before the cancel).
        for _ in range(100):
            if {call["status"] for call in state["calls"]} == {"cancelled"}:
                break
            time.sleep(0.05)
            state = c.get(f"/v1/programs/{pid}").json()
        assert {call["status"] for call in state["calls"]} == {"cancelled"}
        last = c.get(f"/v1/programs/{pid}/variables/v2999", params={"timeout": 5})
        assert last.status_code == 409  # a clear "cancelled", not a hang
    assert not [r for r in caplog.records if "unhandled" in r.getMessage()]


def test_server_is_healthy_after_the_fuzzing(client, caplog):
    assert client.get("/health").status_code == 200
    ok = client.post("/v1/programs", json={"calls": [{"id": "a", "prompt": "hi", "output": "v",
                                                      "sampling": {"max_new_tokens": 4}}]})
    assert ok.status_code == 201
    value = client.get(f"/v1/programs/{ok.json()['program_id']}/variables/v",
                       params={"timeout": 10})
    assert value.status_code == 200 and value.json()["value"]
