"""The OpenAI-compatible proxy, driven by the official `openai` client against a real
uvicorn server that serves the sim engine (with scripted replies for tool calls)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from progserve.app import create_app
from progserve.config import Settings
from progserve.runtime import ServerRuntime

SCRIPT = Path(__file__).parents[1] / "fixtures" / "sim_script.json"

WEATHER_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object",
                                           "properties": {"zone": {"type": "string"}}}}},
]


@pytest.fixture(scope="module")
def server(serve_in_thread):
    settings = Settings(
        sim={"time_scale": 0.02, "script_file": SCRIPT},
        limits={"max_tokens": 4096, "max_request_bytes": 64 * 1024},
    )
    return serve_in_thread(create_app(ServerRuntime(settings)))


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["progserve/sim-llama-3-8b"]


def test_chat_completion(client):
    resp = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Say hello"}], max_tokens=64)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hello! How can I help you today?"
    assert choice.finish_reason == "stop"
    assert resp.usage.completion_tokens > 0 and resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.usage.prompt_tokens_details.cached_tokens >= 0


def test_cached_tokens_reported_on_a_repeated_prefix(client):
    system = "You are a careful assistant. " * 40
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Say hello"}]
    client.chat.completions.create(model="m", messages=messages, max_tokens=8)
    again = client.chat.completions.create(model="m", messages=messages, max_tokens=8)
    assert again.usage.prompt_tokens_details.cached_tokens > 100


def test_chat_streaming_matches_non_streaming(client):
    messages = [{"role": "user", "content": "Write a short poem about queues."}]
    full = client.chat.completions.create(model="m", messages=messages, max_tokens=40,
                                          temperature=0)
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=40,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage, n_chunks = [], None, None, 0
    for chunk in stream:
        n_chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert n_chunks > 3  # really streamed, not one blob
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 40


def test_parallel_tool_calls(client):
    resp = client.chat.completions.create(
        model="m", tools=WEATHER_TOOLS, max_tokens=200,
        messages=[{"role": "user", "content": "What is the weather in Paris and Oslo?"}])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c.function.arguments) for c in calls] == [
        {"city": "Paris"}, {"city": "Oslo", "unit": "celsius"}]
    assert len({c.id for c in calls}) == 2 and all(c.type == "function" for c in calls)
    assert choice.message.content == "Let me check both.\n"

    # The tool results go back; the model answers from them.
    followup = client.chat.completions.create(
        model="m", tools=WEATHER_TOOLS, max_tokens=200,
        messages=[
            {"role": "user", "content": "What is the weather in Paris and Oslo?"},
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": calls[0].id, "content": "Paris: sunny"},
            {"role": "tool", "tool_call_id": calls[1].id, "content": "Oslo: snowy"},
        ])
    assert followup.choices[0].message.content == "It is sunny in Paris and snowy in Oslo."
    assert followup.choices[0].finish_reason == "stop"


def test_parallel_tool_calls_streamed(client):
    stream = client.chat.completions.create(
        model="m", tools=WEATHER_TOOLS, max_tokens=200, stream=True,
        messages=[{"role": "user", "content": "What is the weather in Rome and Kyiv?"}])
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for tc in choice.delta.tool_calls or ():
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert content == "Let me check both.\n"
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "get_weather"]
    assert json.loads(calls[1]["arguments"]) == {"city": "Kyiv", "unit": "celsius"}


def test_tool_calls_as_a_bare_json_list(client):
    resp = client.chat.completions.create(
        model="m", tools=WEATHER_TOOLS, max_tokens=200,
        messages=[{"role": "user", "content": "List tools for Lima as JSON"}])
    calls = resp.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Lima"}), ("get_time", {"zone": "Lima"})]
    assert resp.choices[0].message.content is None


def test_parallel_tool_calls_false_keeps_one(client):
    resp = client.chat.completions.create(
        model="m", tools=WEATHER_TOOLS, parallel_tool_calls=False, max_tokens=200,
        messages=[{"role": "user", "content": "What is the weather in Paris and Oslo?"}])
    assert len(resp.choices[0].message.tool_calls) == 1


def test_tool_choice_none_leaves_text_alone(client):
    resp = client.chat.completions.create(
        model="m", tools=WEATHER_TOOLS, tool_choice="none", max_tokens=200,
        messages=[{"role": "user", "content": "What is the weather in Paris and Oslo?"}])
    assert resp.choices[0].message.tool_calls is None


def test_completions(client):
    resp = client.completions.create(model="m", prompt="The capital of France is",
                                     max_tokens=32)
    assert resp.choices[0].text == " Paris, a city on the Seine."
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.prompt_tokens > 0


def test_completions_batch_stream_and_echo_logprobs(client):
    batch = client.completions.create(model="m", prompt=["The capital of France is",
                                                         "Q: Is the sky blue? A: "],
                                      max_tokens=32)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[1].text == "yes, on a clear day."

    texts: dict[int, str] = {}
    for chunk in client.completions.create(model="m", prompt=["The capital of France is",
                                                              "Q: Is the sky blue? A: "],
                                           max_tokens=32, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {0: " Paris, a city on the Seine.", 1: "yes, on a clear day."}

    echoed = client.completions.create(model="m", prompt="The capital of France is",
                                       max_tokens=32, echo=True, logprobs=1)
    lp = echoed.choices[0].logprobs
    assert echoed.choices[0].text == "The capital of France is Paris, a city on the Seine."
    assert "".join(lp.tokens) == echoed.choices[0].text
    assert lp.token_logprobs[0] is None  # the first prompt token has no logprob
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs(client):
    resp = client.chat.completions.create(model="m", max_tokens=5, logprobs=True,
                                          messages=[{"role": "user", "content": "Say hello"}])
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(t.token for t in content) == resp.choices[0].message.content


# ------------------------------------------------------------------ program identity


def test_program_headers_link_calls_and_end_the_program(client, server):
    pid = "agent-run-1"
    first = client.chat.completions.with_raw_response.create(
        model="m", max_tokens=4, messages=[{"role": "user", "content": "plan"}],
        extra_headers={"X-Program-Id": pid, "X-Thread-Id": "planner"})
    assert first.headers["x-program-id"] == pid
    first_call = first.headers["x-call-id"]
    second = client.chat.completions.with_raw_response.create(
        model="m", max_tokens=4, messages=[{"role": "user", "content": "act"}],
        extra_headers={"X-Program-Id": pid, "X-Parent-Call-Ids": first_call,
                       "X-Call-Id": "act-1"})
    assert second.headers["x-call-id"] == "act-1"
    # The body's metadata names the program too; X-Parent-Calls is accepted as an alias.
    client.chat.completions.create(
        model="m", max_tokens=4, messages=[{"role": "user", "content": "finish"}],
        metadata={"program_id": pid}, extra_headers={"X-Parent-Calls": "act-1",
                                                     "X-Program-End": "true"})
    state = httpx.get(f"{server.url}/v1/programs/{pid}").json()
    assert state["status"] == "finished"
    calls = {c["id"]: c for c in state["calls"]}
    assert len(calls) == 3
    assert calls["act-1"]["parents"] == [first_call]
    assert calls[first_call]["thread_id"] == "planner"
    assert all(c["status"] == "finished" for c in calls.values())


def test_untagged_calls_are_single_call_programs(client, server):
    raw = client.chat.completions.with_raw_response.create(
        model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    state = httpx.get(f"{server.url}/v1/programs/{raw.headers['x-program-id']}").json()
    assert len(state["calls"]) == 1


def test_delete_program_then_calls_to_it_fail(client, server):
    pid = "to-cancel"
    client.chat.completions.create(model="m", max_tokens=2, extra_headers={"X-Program-Id": pid},
                                   messages=[{"role": "user", "content": "hi"}])
    assert httpx.delete(f"{server.url}/v1/programs/{pid}").status_code == 200
    assert httpx.get(f"{server.url}/v1/programs/{pid}").json()["status"] == "cancelled"
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="m", max_tokens=2,
                                       extra_headers={"X-Program-Id": pid},
                                       messages=[{"role": "user", "content": "again"}])
    assert 400 <= err.value.status_code < 500


# ------------------------------------------------------------------ errors


def test_client_errors_are_typed(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=[])
    assert err.value.body["type"] == "invalid_request_error"
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", n=2,
                                       messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", max_tokens=10**6,
                                       messages=[{"role": "user", "content": "x"}])
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="m", tools=WEATHER_TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
            messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", temperature=-1,
                                       messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt=[], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.BadRequestError):  # an invalid program id
        client.chat.completions.create(model="m", extra_headers={"X-Program-Id": "bad id!"},
                                       messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):  # a parent that does not exist
        client.chat.completions.create(model="m", extra_headers={
            "X-Program-Id": "p-parents", "X-Parent-Call-Ids": "ghost"},
            messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize("body", [
    b"not json", b"[1, 2]", b"{}", b'{"messages": "hi"}', b'{"messages": [{"role": "x"}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
    b'{"messages": [{"role": "user", "content": "x"}], "stop": [1, 2]}',
    b'{"messages": [{"role": "user", "content": "x"}], "top_p": 0}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1}',
    b"\xff\xfe",
])
def test_bad_bodies_are_4xx_in_openai_shape(server, body):
    resp = httpx.post(f"{server.url}/v1/chat/completions", content=body,
                      headers={"Content-Type": "application/json"})
    assert 400 <= resp.status_code < 500, resp.text
    error = resp.json()["error"]
    assert error["type"] and error["message"]


def test_oversized_body_is_413(server):
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 70_000}]}
    resp = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert resp.status_code == 413
    assert resp.json()["error"]["type"] == "invalid_request_error"
