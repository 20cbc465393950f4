"""progserve with `--engine openai` in front of an upstream with vLLM's behaviours
(`FakeOpenAI`, answering in-process through an injected transport), driven by the real
`openai` client: chat reaches the upstream's chat route, unknown models are 404, top
logprobs and usage come through, and a prefill-only call never sends `max_tokens: 0`."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "engine_backend"))
from fake_openai import FakeOpenAI  # noqa: E402

from engine_backend.openai_http import OpenAIHTTPEngine  # noqa: E402
from progserve.app import create_app  # noqa: E402
from progserve.config import Settings  # noqa: E402
from progserve.runtime import ServerRuntime  # noqa: E402

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name three colours"}]


def front(serve_in_thread, fake: FakeOpenAI, **settings):
    engine = OpenAIHTTPEngine("http://upstream:8000/v1", transport=fake.transport())
    runtime = ServerRuntime(Settings(engine="openai", **settings), engines=[engine])
    return serve_in_thread(create_app(runtime))


@pytest.fixture(scope="module")
def vllm():
    return FakeOpenAI(owned_by="vllm")


@pytest.fixture(scope="module")
def server(serve_in_thread, vllm):
    return front(serve_in_thread, vllm, model_aliases=["gpt-4o-mini"])


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_chat_reaches_the_upstreams_chat_route_with_the_clients_messages(client, vllm):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}}}}]
    reply = client.chat.completions.create(model="fake/model", messages=MESSAGES,
                                           max_tokens=3, tools=tools, tool_choice="auto")
    assert reply.choices[0].message.content == " w0 w1 w2"
    body = vllm.sent("/v1/chat/completions")[-1]
    assert body["messages"] == MESSAGES  # the upstream applies the model's own template
    assert body["tools"] == tools and body["tool_choice"] == "auto"
    assert not [b for b in vllm.sent("/v1/completions") if "Name three" in str(b.get("prompt"))]


def test_a_named_tool_choice_goes_to_the_upstream_that_enforces_it(client, vllm):
    """The openai engine cannot constrain output itself, but an upstream that serves chat
    (vLLM) enforces a named or required tool_choice: it is passed on, not refused."""
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}}}}]
    named = {"type": "function", "function": {"name": "lookup"}}
    client.chat.completions.create(model="fake/model", messages=MESSAGES, max_tokens=3,
                                   tools=tools, tool_choice=named)
    body = vllm.sent("/v1/chat/completions")[-1]
    assert body["tool_choice"] == named and body["tools"] == tools


def test_unknown_models_are_404_model_not_found(client, server):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
    assert info.value.status_code == 404
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Hello", max_tokens=2)
    # The served name and the configured aliases are accepted.
    for name in ("fake/model", "gpt-4o-mini"):
        assert client.chat.completions.create(model=name, messages=MESSAGES,
                                              max_tokens=1).choices
    assert [m.id for m in client.models.list().data] == ["fake/model"]


def test_any_name_with_the_wildcard_alias(serve_in_thread):
    server = front(serve_in_thread, FakeOpenAI(), model_aliases=["*"])
    resp = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "whatever", "messages": MESSAGES, "max_tokens": 1})
    assert resp.status_code == 200, resp.text


def test_top_logprobs_reach_chat_completions_and_generate(client, server):
    reply = client.chat.completions.create(model="fake/model", messages=MESSAGES, max_tokens=2,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert [len(c.top_logprobs) for c in content] == [3, 3]
    assert content[0].top_logprobs[0].token == " w0"
    assert content[0].top_logprobs[1].token == " alt0"
    stream = client.chat.completions.create(model="fake/model", messages=MESSAGES,
                                            max_tokens=2, logprobs=True, top_logprobs=2,
                                            stream=True)
    tops = [t.token for event in stream if event.choices and event.choices[0].logprobs
            for c in event.choices[0].logprobs.content for t in c.top_logprobs]
    assert tops == [" w0", " alt0", " w1", " alt0"]
    completion = client.completions.create(model="fake/model", prompt="Hello there",
                                           max_tokens=2, logprobs=2)
    assert completion.choices[0].logprobs.top_logprobs == [
        {" w0": -0.5, " alt0": -1.0}, {" w1": -0.5, " alt0": -1.0}]
    generate = httpx.post(server.url + "/generate", json={
        "text": "Hello there", "sampling_params": {"max_new_tokens": 2},
        "return_logprob": True, "top_logprobs_num": 2,
        "return_text_in_logprobs": True}).json()
    assert generate["meta_info"]["output_top_logprobs"] == [
        [[-0.5, -1, " w0"], [-1.0, -1, " alt0"]], [[-0.5, -1, " w1"], [-1.0, -1, " alt0"]]]


def test_streamed_usage_is_never_zero_for_a_prompt(serve_in_thread):
    server = front(serve_in_thread, FakeOpenAI(owned_by="llamacpp"))  # sends no usage
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    events = list(client.chat.completions.create(
        model="fake/model", messages=MESSAGES, max_tokens=3, stream=True,
        stream_options={"include_usage": True}))
    usage = events[-1].usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens == 3


def test_a_prefill_only_call_works_on_vllm(server, vllm):
    """A graph whose first call only prefills (what `fork` sends for a shared prefix):
    vLLM rejects `max_tokens: 0`, so it must never see one."""
    resp = httpx.post(server.url + "/v1/programs", json={"calls": [
        {"id": "warm", "prompt": "A long shared prefix", "output": "warm",
         "sampling": {"max_new_tokens": 0}},
        {"id": "go", "prompt": "A long shared prefix{{warm}} and more", "output": "go",
         "sampling": {"max_new_tokens": 2}}]})
    assert resp.status_code == 201, resp.text
    pid = resp.json()["program_id"]
    value = httpx.get(f"{server.url}/v1/programs/{pid}/variables/go", params={"timeout": 30})
    assert value.status_code == 200, value.text
    assert 0 not in [b.get("max_tokens") for b in vllm.sent("/v1/completions")]
