"""Request models of the SGLang-compatible native API (`/generate`, `/abort_request`).

They follow SGLang's `GenerateReqInput`: `text` or `input_ids`, each single or a batch;
per-item or shared `sampling_params`, `rid`, `return_logprob`, `logprob_start_len`,
`top_logprobs_num`; `stream`; `priority` (an int; larger is more urgent, SGLang's
default convention). Sampling keys SGLang accepts but that do not apply here
(`skip_special_tokens`, `spaces_between_special_tokens`, penalties, ...) are accepted and
ignored, so SGLang's own frontend can send what it always sends.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from engine_backend.types import SamplingParams


class SGLangSamplingParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_new_tokens: int | None = Field(128, ge=0)
    min_new_tokens: int | None = Field(0, ge=0)
    temperature: float | None = Field(1.0, ge=0.0, le=100.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(-1, ge=-1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    regex: str | None = None
    json_schema: str | None = None
    n: int | None = Field(1, ge=1, le=1)
    sampling_seed: int | None = None
    seed: int | None = None

    @model_validator(mode="after")
    def _min_within_max(self) -> SGLangSamplingParams:
        max_new = 128 if self.max_new_tokens is None else self.max_new_tokens
        if (self.min_new_tokens or 0) > max_new:
            raise PydanticCustomError(
                "min_tokens_over_max", "min_new_tokens ({min}) must not exceed "
                "max_new_tokens ({max})", {"min": self.min_new_tokens, "max": max_new})
        return self

    def to_engine(self) -> SamplingParams:
        """SGLang sends explicit nulls for unset fields: they mean the defaults."""
        max_new = 128 if self.max_new_tokens is None else self.max_new_tokens
        top_k = -1 if self.top_k in (None, 0) else self.top_k
        return SamplingParams(
            max_new_tokens=max_new,
            min_new_tokens=self.min_new_tokens or 0,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=top_k,
            stop=self.stop or [],
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=bool(self.ignore_eos),
            regex=self.regex,
            json_schema=self.json_schema,
            seed=self.sampling_seed if self.sampling_seed is not None else self.seed,
        )


def _per_item(value: Any, n: int, name: str) -> list[Any]:
    """A batch field: one value for all items, or a list with one per item."""
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"`{name}` has {len(value)} entries for a batch of {n}")
        return value
    return [value] * n


def _batch(item: Any) -> Any:
    """A batch field's list form: one entry per prompt, so never empty."""
    return Annotated[list[item], Field(min_length=1, max_length=4096)]


Prompt = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Rid = Annotated[str, Field(max_length=200)]
StartLen = Annotated[int, Field(ge=-1)]
TopLogprobs = Annotated[int, Field(ge=0, le=20)]

# Exactly one of `text` and `input_ids` (a null counts as absent), in the schema too.
_ONE_PROMPT_KIND = {"oneOf": [
    {"required": ["text"], "properties": {"text": {"not": {"type": "null"}},
                                          "input_ids": {"type": "null"}}},
    {"required": ["input_ids"], "properties": {"input_ids": {"not": {"type": "null"}},
                                               "text": {"type": "null"}}},
]}


class GenerateInput(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra=_ONE_PROMPT_KIND)

    text: Prompt | _batch(Prompt) | None = None
    input_ids: TokenIds | _batch(TokenIds) | None = None
    sampling_params: SGLangSamplingParams | _batch(SGLangSamplingParams) | None = None
    rid: Rid | _batch(Rid) | None = None
    return_logprob: bool | _batch(bool) | None = False
    logprob_start_len: StartLen | _batch(StartLen) | None = -1
    top_logprobs_num: TopLogprobs | _batch(TopLogprobs) | None = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    priority: int | None = None

    @field_validator("text")
    @classmethod
    def _texts(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("`text` must not be an empty list")
        return v

    @field_validator("input_ids")
    @classmethod
    def _ids(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("`input_ids` must not be empty")
        return v

    @model_validator(mode="after")
    def _one_prompt_kind(self) -> GenerateInput:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of `text` or `input_ids`")
        n = self.batch_size
        if n > 1024:
            raise ValueError("at most 1024 prompts per request")
        for name in ("sampling_params", "rid", "return_logprob", "logprob_start_len",
                     "top_logprobs_num"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != n:
                raise PydanticCustomError(
                    "batch_length_mismatch", "`{name}` has {got} entries for a batch of {n}",
                    {"name": name, "got": len(value), "n": n})
        if isinstance(self.rid, list) and len(set(self.rid)) != len(self.rid):
            raise ValueError("`rid` values must be unique")
        return self

    @property
    def is_batch(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, list)
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)

    @property
    def batch_size(self) -> int:
        if not self.is_batch:
            return 1
        return len(self.text if self.text is not None else self.input_ids)  # type: ignore[arg-type]

    def items(self) -> list[GenerateItem]:
        n = self.batch_size
        if self.text is not None:
            prompts: list[Any] = self.text if isinstance(self.text, list) else [self.text]
        else:
            prompts = self.input_ids if self.is_batch else [self.input_ids]  # type: ignore[assignment]
        sampling = _per_item(self.sampling_params or SGLangSamplingParams(), n,
                             "sampling_params")
        rids = _per_item(self.rid, n, "rid") if isinstance(self.rid, list) else \
            [self.rid if n == 1 else (f"{self.rid}-{i}" if self.rid else None) for i in range(n)]
        want_lp = _per_item(bool(self.return_logprob) if not isinstance(self.return_logprob, list)
                            else self.return_logprob, n, "return_logprob")
        starts = _per_item(-1 if self.logprob_start_len is None else self.logprob_start_len, n,
                           "logprob_start_len")
        tops = _per_item(self.top_logprobs_num or 0, n, "top_logprobs_num")
        return [
            GenerateItem(
                index=i,
                prompt=prompts[i],
                sampling=sampling[i],
                rid=rids[i],
                return_logprob=bool(want_lp[i]),
                logprob_start_len=int(starts[i] if starts[i] is not None else -1),
                top_logprobs_num=int(tops[i] or 0),
            )
            for i in range(n)
        ]


class GenerateItem(BaseModel):
    """One prompt of a (possibly batched) `/generate` request."""

    index: int
    prompt: str | list[int]
    sampling: SGLangSamplingParams
    rid: str | None
    return_logprob: bool
    logprob_start_len: int = Field(ge=-1)
    top_logprobs_num: int = Field(ge=0, le=20)


class AbortRequestInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    rid: str = ""
    abort_all: bool = False
