"""The native program API's wire schema: what a client (the DSL) and the server exchange.

Requests: a program is a set of calls over *semantic variables* (Parrot). An LLM call
renders its `prompt` template, whose `{{name}}` placeholders reference variables, or its
`messages` (chat roles whose contents are such templates; the engine side renders them
with the model's own chat template), and writes its output to the variable `output`. A
tool call passes `args` (values may be templates too) to a registered tool and writes the
result to `output`. The data flow between variables is the DAG; `parents` adds explicit
edges (OpenAI-proxy style, where no variables exist).

Answers: `ProgramState` (with `CallState`s and `ProgramHistoryState`), what the server
reports about a program.

This module is the whole contract between a client machine and a server: it imports
nothing of the server (pydantic, and the engines' `SamplingParams` model only), so a
remote DSL client loads no scheduler, engine or HTTP-server code.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine_backend.types import SamplingParams

# `{{name}}` with optional spaces; names are identifiers, optionally dotted (`a.b`).
VARIABLE_REF = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.\-]*)\s*\}\}")
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.\-]*$"


def referenced_variables(template: str) -> list[str]:
    """Names referenced by `{{name}}` placeholders, in order of first use."""
    return list(dict.fromkeys(VARIABLE_REF.findall(template)))


# What `CallSpec._kind_fields` requires, in the JSON schema too: a tool call names its
# tool, any other call (kind absent means llm) has a prompt or messages.
_KIND_FIELDS_SCHEMA = {
    "if": {"properties": {"kind": {"const": "tool"}}, "required": ["kind"]},
    "then": {"required": ["tool"], "properties": {"tool": {"type": "string", "minLength": 1}}},
    # any other call has exactly one of a prompt and messages
    "else": {"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}],
             "properties": {"prompt": {"type": "string"}}},
}

MAX_MESSAGES = 1024


class MessageSpec(BaseModel):
    """One chat message of a message-form call; `content` is a template."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(description="template; {{var}} references a variable")


class CallSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_KIND_FIELDS_SCHEMA)

    id: str = Field(min_length=1, max_length=128, pattern=NAME_PATTERN)
    kind: Literal["llm", "tool"] = "llm"
    output: str | None = Field(None, pattern=NAME_PATTERN, description="variable it fills")
    # LLM calls: a text prompt, or chat messages the engine side renders with the model's
    # own chat template (then the output is the assistant's turn)
    prompt: str | None = Field(None, description="template; {{var}} references a variable")
    messages: list[MessageSpec] | None = Field(
        None, min_length=1, max_length=MAX_MESSAGES,
        description="chat messages instead of `prompt`; contents are templates")
    add_generation_prompt: bool = Field(
        True, description="messages: open the assistant's turn (false: the messages only, "
        "a prefix later calls extend)")
    continue_final_message: bool = Field(
        False, description="messages: the last one is an assistant's partial answer that "
        "the output continues")
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    choices: list[str] | None = Field(None, min_length=1,
                                      description="constrained choice (select)")
    # tool calls
    tool: str | None = Field(None, max_length=128)
    args: dict[str, Any] = Field(default_factory=dict)
    # scheduling
    parents: list[str] = Field(default_factory=list, description="explicit parent call ids")
    thread_id: str | None = None
    priority_hint: float | None = Field(None, description="lower is more urgent")
    latency_critical: bool = False

    @model_validator(mode="after")
    def _kind_fields(self) -> CallSpec:
        if self.kind == "llm" and (self.prompt is None) == (self.messages is None):
            raise ValueError(f"llm call {self.id!r} needs exactly one of `prompt` and "
                             "`messages`")
        if self.continue_final_message and (
            not self.messages or self.messages[-1].role != "assistant"
        ):
            raise ValueError(f"call {self.id!r}: `continue_final_message` needs messages "
                             "that end with an assistant message")
        if self.kind == "tool" and not self.tool:
            raise ValueError(f"tool call {self.id!r} needs a `tool` name")
        if self.choices is not None and not self.choices:
            raise ValueError(f"call {self.id!r}: `choices` must not be empty")
        return self

    def prompt_chars(self) -> int:
        """The size of its prompt template (or of its messages' contents)."""
        if self.messages is not None:
            return sum(len(m.content) for m in self.messages)
        return len(self.prompt or "")

    def input_variables(self) -> list[str]:
        """Variables this call reads, from its prompt and its templated args."""
        names: list[str] = []
        if self.prompt:
            names += referenced_variables(self.prompt)
        for message in self.messages or ():
            names += referenced_variables(message.content)
        for value in self.args.values():
            if isinstance(value, str):
                names += referenced_variables(value)
        return list(dict.fromkeys(names))


class ProgramSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    program_id: str | None = Field(None, max_length=128, pattern=NAME_PATTERN)
    inputs: dict[Annotated[str, Field(pattern=NAME_PATTERN)], str] = Field(
        default_factory=dict, description="initial variable values",
        json_schema_extra={"additionalProperties": False})  # names match the pattern
    calls: list[CallSpec] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)


# ---------------------------------------------------------------- answers

CallStatusName = Literal["pending", "queued", "running", "finished", "failed", "cancelled"]
ProgramStatusName = Literal["running", "idle", "finished", "failed", "cancelled"]


class CallState(BaseModel):
    id: str
    kind: Literal["llm", "tool"]
    status: CallStatusName
    thread_id: str | None = None
    parents: list[str] = Field(default_factory=list)
    output: str | None = Field(None, description="the variable this call fills")
    tool: str | None = None
    replica: int | None = None
    priority: float = Field(0.0, description="the policy's attained-service rank (lower first)")
    queue_level: int = 0
    created_at: float
    queued_at: float | None = None
    dispatched_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    queue_wait_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    service: float = 0.0
    preemptions: int = 0
    error: str | None = None


class ProgramHistoryState(BaseModel):
    """Attained service and waits, as the policies see them."""

    service: float = Field(0.0, description="attained service (service units; see config)")
    engine_time_s: float = 0.0
    weighted_tokens: float = 0.0
    wait_s: float = 0.0
    calls_finished: int = 0
    engines_used: list[int] = Field(default_factory=list)
    active_threads: list[str] = Field(default_factory=list)


class ProgramState(BaseModel):
    id: str
    tenant: str
    status: ProgramStatusName
    arrival: float
    ended_at: float | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    calls: list[CallState] = Field(default_factory=list)
    variables: dict[str, str | None] = Field(
        default_factory=dict, description="value, or null while not yet produced"
    )
    history: ProgramHistoryState = Field(default_factory=ProgramHistoryState)
    error: str | None = None
