"""The engine interface's data types: what goes into an engine and what streams out.

Requests are pydantic models because they are validated at the boundary (bad input must
raise a typed error, never crash an engine). Chunks are slotted dataclasses because an
engine emits many of them on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic_core import PydanticCustomError


class SamplingParams(BaseModel):
    """Sampling parameters, named as SGLang names them (`max_new_tokens`, `stop`, ...)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=0, description="0 means prefill only (used by select)")
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 disables top-k")
    # One string, a list, or null (no stop): normalised to a list by `_stop_as_list`.
    stop: Annotated[list[str], WithJsonSchema({"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]})
    ] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    regex: str | None = None
    json_schema: str | None = None
    n: int = Field(1, ge=1, le=1, description="engines take one sequence per request")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: Any) -> Any:
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _min_within_max(self) -> SamplingParams:
        # SGLang's rule too. It is also what bounds `min_new_tokens` wherever
        # `max_new_tokens` is capped (`limits.max_tokens` at every entrance).
        if self.min_new_tokens > self.max_new_tokens:
            raise PydanticCustomError(
                "min_tokens_over_max",
                "min_new_tokens ({min}) must not exceed max_new_tokens ({max})",
                {"min": self.min_new_tokens, "max": self.max_new_tokens})
        return self


class ChatPrompt(BaseModel):
    """The chat a prompt was rendered from (OpenAI message shape).

    An engine that serves chat itself (an OpenAI-compatible upstream) sends these messages
    to its chat endpoint, so the upstream applies the model's own template; engines that
    take text use `GenerateRequest.text` (the rendering) and ignore this.
    """

    model_config = ConfigDict(extra="forbid")

    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    assistant_prefix: str = Field(
        "", description="the answer so far (a resumed call): the upstream continues it")
    # How the rendering ends (chat_template.py; vLLM's chat API takes the same two flags).
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class GenerateRequest(BaseModel):
    """One generation request to one engine.

    `priority`: *lower values are served first* (it is the scheduler's attained-service
    rank; 0 is the most urgent). Backends translate it to their engine's convention.
    `program_id` lets an engine attribute cache entries to a program, so that retention
    hints (`Engine.retain`, `Engine.program_ended`) can name them. The scheduler leaves it
    unset for an untagged request (a one-call program no hint will ever name).
    `chat`: the messages `text` was rendered from, for engines that serve chat themselves.
    `cache_salt`: requests share cached prefixes only with requests of the same salt (the
    scheduler sets it per tenant, so a cache hit never crosses tenants; vLLM's
    `cache_salt`). `None` shares with every other unsalted request.
    """

    model_config = ConfigDict(extra="forbid")

    rid: str = Field(min_length=1, max_length=256)
    text: str | None = None
    input_ids: list[int] | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    priority: float = 0.0
    program_id: str | None = None
    return_logprob: bool = False
    logprob_start_len: int = Field(-1, ge=-1, description="-1: output tokens only")
    top_logprobs_num: int = Field(0, ge=0, le=20)
    chat: ChatPrompt | None = None
    cache_salt: str | None = Field(None, max_length=256)
    stream: bool = Field(
        True,
        description="False: the caller only needs the whole answer (a non-streamed client "
        "call), so an HTTP engine may make one non-streamed upstream call and yield it as a "
        "single final chunk. In-process engines stream either way.",
    )

    @model_validator(mode="after")
    def _exactly_one_prompt(self) -> GenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of `text` or `input_ids`")
        if self.text is not None and self.text == "":
            raise ValueError("`text` must not be empty")
        if self.input_ids is not None and len(self.input_ids) == 0:
            raise ValueError("`input_ids` must not be empty")
        return self


class FinishType(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(slots=True, frozen=True)
class FinishReason:
    """SGLang's finish reason: `{"type": "stop", "matched": ...}`, `{"type": "length",
    "length": n}` or `{"type": "abort", "message": ...}`."""

    type: FinishType
    matched: str | int | None = None
    length: int | None = None
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type.value}
        if self.type is FinishType.STOP:
            out["matched"] = self.matched
        elif self.type is FinishType.LENGTH:
            out["length"] = self.length
        else:
            out["message"] = self.message
        return out


# A logprob entry as SGLang returns it: (logprob, token_id, token_text or None).
LogprobEntry = tuple[float, int, str | None]


@dataclass(slots=True)
class Chunk:
    """A piece of a generation stream. `text` and `token_ids` are deltas (new since the
    previous chunk). The final chunk has `finish_reason` set and the token counters
    filled; earlier chunks may leave the counters at 0."""

    rid: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[LogprobEntry] | None = None
    input_logprobs: list[LogprobEntry] | None = None  # final chunk only
    # The `top_logprobs_num` most likely tokens at each output (input) position, when asked.
    output_top_logprobs: list[list[LogprobEntry]] | None = None
    input_top_logprobs: list[list[LogprobEntry]] | None = None  # final chunk only
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True, frozen=True)
class Capabilities:
    priority: bool = False  # honours GenerateRequest.priority
    logprobs: bool = False  # output and prompt logprobs
    constrained_decoding: bool = False  # regex / json_schema
    token_ids: bool = False  # accepts input_ids, returns token ids
    retention: bool = False  # honours Engine.retain hints
    abort: bool = True
    chat: bool = False  # serves `GenerateRequest.chat` itself (the upstream renders it)


@dataclass(slots=True, frozen=True)
class EngineStats:
    queue_len: int  # waiting inside the engine
    running: int  # decoding or prefilling now
    kv_used_tokens: int
    kv_capacity_tokens: int
    cache_hit_tokens: int  # cumulative prompt tokens served from the prefix cache
    cache_query_tokens: int  # cumulative prompt tokens looked up
    preemptions: int = 0  # cumulative retractions / preemptions
    recomputed_tokens: int = 0  # cumulative prefill tokens redone after preemption
    busy_s: float = 0.0  # cumulative seconds spent running model steps (0: not reported)

    @property
    def kv_usage(self) -> float:
        return self.kv_used_tokens / self.kv_capacity_tokens if self.kv_capacity_tokens else 0.0

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hit_tokens / self.cache_query_tokens if self.cache_query_tokens else 0.0


@dataclass(slots=True, frozen=True)
class ModelInfo:
    model_path: str
    tokenizer_path: str | None = None
    is_generation: bool = True
    max_context_len: int = 8192
    chat_template: str | None = None
