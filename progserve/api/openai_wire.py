"""Request models of the OpenAI-compatible routes.

Lenient where OpenAI clients send fields that do not change the answer here (unknown
fields are ignored), strict on what would (n > 1, non-text content parts, bad ranges).
Responses are plain dicts serialised with orjson: building pydantic models per token
would cost more than the rest of the proxy path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

# What the validators below require, said in the schema too (so a client generated from
# it, or a schema-driven fuzzer, never sends a "valid" body that is refused).
NonEmptyText = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
PROGRAM_ID_PATTERN = r"^[A-Za-z0-9_.:\-]{0,128}$"  # empty: no program


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionDef(_Lenient):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class ToolChoiceFunction(_Lenient):
    name: str


class ToolChoiceNamed(_Lenient):
    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class FunctionCallIn(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ContentPart(_Lenient):
    type: Literal["text", "input_text"]
    text: str = ""


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", "input_text"):
                    raise ValueError(f"content part type {kind!r} is not supported (text only)")
        return v

    @field_validator("content")
    @classmethod
    def _joined_text(cls, v: Any) -> Any:
        return "".join(part.text for part in v) if isinstance(v, list) else v

    def to_template(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": "tool" if self.role == "function" else self.role,
                               "content": self.content or ""}
        if self.name:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [tc.model_dump() for tc in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


class JsonSchemaFormat(_Lenient):
    """`response_format.json_schema`: the schema the answer must follow."""

    name: str | None = Field(None, max_length=256)
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "if": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]},
        "then": {"required": ["json_schema"],
                 "properties": {"json_schema": {"not": {"type": "null"}}}},
    })

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs `json_schema` with a `schema` object")
        return self


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    model: str = ""
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1, le=1)
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = Field(None, json_schema_extra={"properties": {
        "program_id": {"type": "string", "pattern": PROGRAM_ID_PATTERN}}})
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    ignore_eos: bool = False  # vLLM / SGLang extension
    min_tokens: int | None = Field(
        None, ge=0, description="vLLM / SGLang extension: generate at least this many tokens "
        "(at most max_tokens)")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: Any) -> list[str]:
        if v is None:
            return []
        return [v] if isinstance(v, str) else list(v)


def check_min_tokens(min_tokens: int | None, max_tokens: int | None) -> None:
    """`min_tokens` never exceeds `max_tokens` (when the request leaves `max_tokens` to
    the server's default, the engine request's own check applies)."""
    if min_tokens and max_tokens is not None and min_tokens > max_tokens:
        raise PydanticCustomError("min_tokens_over_max",
                                  "min_tokens ({min}) must not exceed max_tokens ({max})",
                                  {"min": min_tokens, "max": max_tokens})


class ChatCompletionRequest(_SamplingFields):
    model_config = ConfigDict(extra="ignore", json_schema_extra={
        "if": {"properties": {"tool_choice": {"const": "required"}}, "required": ["tool_choice"]},
        "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
    })

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceNamed | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        if isinstance(self.tool_choice, ToolChoiceNamed):
            names = {t.function.name for t in self.tools or ()}
            if self.tool_choice.function.name not in names:
                raise PydanticCustomError("tool_choice_unknown_tool",
                                          "tool_choice names {name!r}, which is not in `tools`",
                                          {"name": self.tool_choice.function.name})
        if self.tool_choice in ("required",) and not self.tools:
            raise ValueError("tool_choice 'required' needs `tools`")
        return self

    @model_validator(mode="after")
    def _min_within_max(self) -> ChatCompletionRequest:
        check_min_tokens(self.min_tokens, self.requested_max_tokens)
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


class CompletionRequest(_SamplingFields):
    # The wire allows the largest batch a server may be configured for; the server's own
    # `limits.max_batch` answers a 400 that names it (and is the schema's maxItems).
    prompt: (NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1, max_length=4096)]
             | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=4096)])
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: str | None = Field(None, max_length=0, description="insertion is not supported")

    @model_validator(mode="after")
    def _min_within_max(self) -> CompletionRequest:
        check_min_tokens(self.min_tokens, self.max_tokens)
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the batch: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]
