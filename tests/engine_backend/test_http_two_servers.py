"""End to end over real processes: progserve A uses progserve B as its `sglang` backend
(and C uses B as its `openai` backend), proving that the HTTP engines speak the real
protocols. B serves the sim engine; every client talks to A or C only."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parents[1] / "fixtures" / "sim_script.json"


@pytest.fixture(scope="module")
def engine_server(serve_process):
    return serve_process("--engine", "sim", env={"PROGSERVE_SIM__TIME_SCALE": "0.3",
                                                "PROGSERVE_SIM__SCRIPT_FILE": str(SCRIPT)})


@pytest.fixture(scope="module")
def sglang_front(serve_process, engine_server):
    return serve_process("--engine", "sglang", "--engine-url", engine_server.url,
                         "--policy", "plas")


@pytest.fixture(scope="module")
def openai_front(serve_process, engine_server):
    return serve_process("--engine", "openai", "--engine-url", engine_server.url + "/v1")


def engine_programs(engine_server) -> int:
    return len(httpx.get(engine_server.url + "/v1/programs").json()["data"])


def engine_running(engine_server) -> int:
    info = httpx.get(engine_server.url + "/get_server_info").json()
    return info["internal_states"][0]["running"]


def test_chat_through_the_sglang_backend(sglang_front, engine_server):
    before = engine_programs(engine_server)
    client = openai.OpenAI(base_url=sglang_front.url + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model="m", max_tokens=64, messages=[{"role": "user", "content": "Say hello"}])
    assert reply.choices[0].message.content == "Hello! How can I help you today?"
    assert reply.model == "progserve/sim-llama-3-8b"  # A learned it from B's /get_model_info
    assert engine_programs(engine_server) == before + 1  # the call really went to B

    stream = client.chat.completions.create(
        model="m", max_tokens=64, stream=True, messages=[{"role": "user", "content": "Say hello"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        "Hello! How can I help you today?"


def test_generate_with_logprobs_through_the_sglang_backend(sglang_front, engine_server):
    body = {"text": "Q: Is the sky blue? A: yes", "return_logprob": True,
            "logprob_start_len": 1, "return_text_in_logprobs": True,
            "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    via_a = httpx.post(sglang_front.url + "/generate", json=body).json()
    direct = httpx.post(engine_server.url + "/generate", json=body).json()
    assert via_a["text"] == direct["text"] and via_a["output_ids"] == direct["output_ids"]
    for key in ("input_token_logprobs", "output_token_logprobs", "prompt_tokens",
                "completion_tokens"):
        assert via_a["meta_info"][key] == direct["meta_info"][key]


def test_streams_and_aborts_cross_both_servers(sglang_front, engine_server):
    with httpx.stream("POST", sglang_front.url + "/generate", json={
            "text": "Write forever", "rid": "chain-1", "stream": True,
            "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}) as resp:
        lines = resp.iter_lines()
        event = json.loads(next(line for line in lines if line.startswith("data:"))[5:])
        assert event["meta_info"]["finish_reason"] is None
        assert engine_running(engine_server) == 1
        assert httpx.post(sglang_front.url + "/abort_request",
                          json={"rid": "chain-1"}).json()["aborted"] == 1
        events = [json.loads(line[5:]) for line in lines
                  if line.startswith("data:") and line != "data: [DONE]"]
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    deadline = time.monotonic() + 2
    while engine_running(engine_server) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine_running(engine_server) == 0  # B's engine request was aborted too


def test_program_identity_is_kept_on_the_front(sglang_front):
    headers = {"X-Program-Id": "chain-prog"}
    first = httpx.post(sglang_front.url + "/generate", headers=headers, json={
        "text": "step one", "sampling_params": {"max_new_tokens": 2}})
    httpx.post(sglang_front.url + "/generate", json={
        "text": "step two", "sampling_params": {"max_new_tokens": 2}},
        headers={**headers, "X-Parent-Call-Ids": first.headers["x-call-id"]})
    state = httpx.get(sglang_front.url + "/v1/programs/chain-prog").json()
    assert [c["status"] for c in state["calls"]] == ["finished", "finished"]
    assert state["history"]["calls_finished"] == 2


def test_chat_and_logprobs_through_the_openai_backend(openai_front, engine_server):
    client = openai.OpenAI(base_url=openai_front.url + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model="m", max_tokens=64, messages=[{"role": "user", "content": "Say hello"}])
    assert reply.choices[0].message.content == "Hello! How can I help you today?"
    info = httpx.get(openai_front.url + "/get_server_info").json()
    assert info["capabilities"]["logprobs"] is True  # probed from B
    assert info["capabilities"]["priority"] is False
    body = httpx.post(openai_front.url + "/generate", json={
        "text": "Q: Is the sky blue? A: yes", "return_logprob": True, "logprob_start_len": 0,
        "return_text_in_logprobs": True,
        # ignore_eos: the synthetic reply may otherwise end (EOS) before 3 tokens.
        "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}).json()
    assert len(body["meta_info"]["output_token_logprobs"]) == 3
    assert body["meta_info"]["input_token_logprobs"][0][0] is None


def test_sglang_frontend_through_the_chain(sglang_front):
    sgl = pytest.importorskip("sglang", reason="run scripts/install_sglang_frontend.sh")

    @sgl.function
    def quiz(s):
        s += "Q: Is the sky blue? A: " + sgl.gen("answer", max_tokens=16, stop="\n")
        s += "\nSure? " + sgl.select("sure", choices=["yes", "no"])

    state = quiz.run(backend=sgl.RuntimeEndpoint(sglang_front.url))
    assert state["answer"] == "yes, on a clear day."
    assert state["sure"] in ("yes", "no")
