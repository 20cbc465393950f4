"""The engine request of a graph (DSL) LLM call: its prompt, filled in and rendered.

A graph call's prompt is a template over the program's semantic variables, or chat
messages whose contents are such templates. Once its inputs have values the call gets its
engine request here: templates filled in, and messages rendered with the model's own chat
template (`engine_backend.chat_template`, the model's template as its engine reports it),
the same rendering the OpenAI proxy gives the same messages. The request carries both the
text (engines that take text, and the router's prefix estimate, use it) and the messages
(`GenerateRequest.chat`: an upstream that serves chat itself gets them). Calls of one
program, and the branches of a fork, render to texts that extend each other, so the
engine's prefix cache serves what earlier calls already prefilled.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Protocol

from engine_backend.base import Engine
from engine_backend.chat_template import compiled_template
from engine_backend.types import Capabilities, ChatPrompt, GenerateRequest, SamplingParams

from .choices import choices_regex
from .program import CallNode, VariableSlot
from .spec import VARIABLE_REF, CallSpec


class ReplicaView(Protocol):
    """What a request is built against: a replica's engine and what it can do (all
    replicas serve one model, so the first one's model and capabilities stand for all)."""

    engine: Engine
    capabilities: Capabilities


def fill(template: str, variables: Mapping[str, VariableSlot]) -> str:
    """`{{name}}` placeholders replaced by the variables' values, in one pass."""
    return VARIABLE_REF.sub(lambda m: variables[m.group(1)].value or "", template)


def graph_llm_request(call: CallNode, replica: ReplicaView) -> GenerateRequest:
    """The engine request of `call`, an LLM call whose inputs all have values. Raises the
    engine's `InvalidRequestError` when the model's chat template rejects the messages."""
    spec = call.spec
    assert spec is not None
    program = call.program
    sampling = _choice_constrained(spec, replica.capabilities)
    chat: ChatPrompt | None = None
    if spec.messages is None:
        text = fill(spec.prompt or "", program.variables)
    else:
        text, chat, stop = _rendered_messages(spec, program.variables, replica.engine)
        if stop:
            sampling = sampling.model_copy(update={"stop": [*sampling.stop, *stop]})
    return GenerateRequest.model_construct(
        rid=f"{program.engine_key}/{call.id}/{uuid.uuid4().hex[:8]}",
        text=text,
        input_ids=None,
        sampling=sampling,
        priority=spec.priority_hint or 0.0,
        program_id=program.engine_key,
        return_logprob=False,
        logprob_start_len=-1,
        top_logprobs_num=0,
        chat=chat,
    )


def _choice_constrained(spec: CallSpec, capabilities: Capabilities) -> SamplingParams:
    """A `select`: where the engine constrains decoding, its output can only be a choice
    (elsewhere the scheduler maps the text to the nearest choice afterwards)."""
    if not spec.choices or not capabilities.constrained_decoding:
        return spec.sampling
    return spec.sampling.model_copy(update={"regex": choices_regex(spec.choices)})


def _rendered_messages(
    spec: CallSpec, variables: Mapping[str, VariableSlot], engine: Engine
) -> tuple[str, ChatPrompt, list[str]]:
    """(text, messages, stop strings the template needs) of a message-form call."""
    messages = [
        {"role": m.role, "content": fill(m.content, variables)} for m in spec.messages or ()
    ]
    template = compiled_template(engine.model_info().chat_template)
    text = template.render(
        messages,
        add_generation_prompt=spec.add_generation_prompt and not spec.continue_final_message,
        continue_final_message=spec.continue_final_message,
    )
    chat = ChatPrompt.model_construct(
        messages=messages,
        tools=None,
        tool_choice=None,
        add_generation_prompt=spec.add_generation_prompt,
        continue_final_message=spec.continue_final_message,
    )
    return text, chat, template.stop
