"""Wire models of a program graph: what the DSL and the native API submit.

A program is a set of calls over *semantic variables* (Parrot). An LLM call renders its
`prompt` template, whose `{{name}}` placeholders reference variables, and writes its
output to the variable `output`. A tool call passes `args` (values may be templates too)
to a registered tool and writes the result to `output`. The data flow between variables
is the DAG; `parents` adds explicit edges (OpenAI-proxy style, where no variables exist).
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
# tool, any other call (kind absent means llm) has a prompt.
_KIND_FIELDS_SCHEMA = {
    "if": {"properties": {"kind": {"const": "tool"}}, "required": ["kind"]},
    "then": {"required": ["tool"], "properties": {"tool": {"type": "string", "minLength": 1}}},
    "else": {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
}


class CallSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_KIND_FIELDS_SCHEMA)

    id: str = Field(min_length=1, max_length=128, pattern=NAME_PATTERN)
    kind: Literal["llm", "tool"] = "llm"
    output: str | None = Field(None, pattern=NAME_PATTERN, description="variable it fills")
    # LLM calls
    prompt: str | None = Field(None, description="template; {{var}} references a variable")
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
        if self.kind == "llm" and self.prompt is None:
            raise ValueError(f"llm call {self.id!r} needs a `prompt`")
        if self.kind == "tool" and not self.tool:
            raise ValueError(f"tool call {self.id!r} needs a `tool` name")
        if self.choices is not None and not self.choices:
            raise ValueError(f"call {self.id!r}: `choices` must not be empty")
        return self

    def input_variables(self) -> list[str]:
        """Variables this call reads, from its prompt and its templated args."""
        names: list[str] = []
        if self.prompt:
            names += referenced_variables(self.prompt)
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
