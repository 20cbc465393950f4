"""The two wire protocols a probe speaks for completions: OpenAI's `/v1/completions` and
SGLang's native `/generate`. Each turns a prompt plus options into a request and reads the
same facts back (text, usage, logprobs, a stream's end), so the checks are written once.
Chat and tools use OpenAI's `/v1/chat/completions` on both (SGLang serves it too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .http import Answer, ProbeClient, StreamAnswer


@dataclass(slots=True)
class ServerInfo:
    model: str | None = None
    max_len: int | None = None
    error: str = ""  # why the server is not one of this protocol's


@dataclass(slots=True)
class StreamSummary:
    text: str
    finished: bool  # a finish reason arrived
    prompt_tokens: int  # from a usage block in the stream (0: none)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class OpenAIDialect:
    name = "openai"
    path = "/v1/completions"
    # vLLM: lower values are served first.
    high_priority = -10
    low_priority = 10
    priority_hint = "vLLM honours it under --scheduling-policy priority"

    async def identify(self, client: ProbeClient, model: str | None) -> ServerInfo:
        answer = await client.get("/v1/models")
        if not answer.ok:
            return ServerInfo(model, error=f"GET /v1/models: {answer.error}")
        models = answer.data.get("data") if isinstance(answer.data, dict) else None
        if not isinstance(models, list):
            return ServerInfo(model, error="GET /v1/models: no `data` list")
        entry = next((m for m in models if isinstance(m, dict)
                      and (model is None or m.get("id") == model)), None)
        if entry is None:
            return ServerInfo(model, error=f"GET /v1/models does not list {model!r}"
                              if model else "GET /v1/models lists no model")
        return ServerInfo(entry.get("id"), _int(entry.get("max_model_len")) or None)

    def body(self, model: str | None, prompt: str, max_tokens: int, *, stream: bool = False,
             logprobs: int = 0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                "temperature": 0, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if logprobs:
            body["logprobs"] = logprobs
        return {**body, **(extra or {})}

    def text(self, data: Any) -> str | None:
        choice = first_choice(data)
        text = choice.get("text") if choice else None
        return text if isinstance(text, str) else None

    def usage(self, data: Any) -> tuple[int, int]:
        """(prompt tokens, cached tokens)."""
        usage = data.get("usage") if isinstance(data, dict) else None
        if not isinstance(usage, dict):
            return 0, 0
        details = usage.get("prompt_tokens_details") or {}
        cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
        return _int(usage.get("prompt_tokens")), cached

    def logprobs(self, data: Any) -> tuple[int, int]:
        """(output tokens with a logprob, alternatives given for the first token)."""
        choice = first_choice(data)
        logprobs = choice.get("logprobs") if choice else None
        if not isinstance(logprobs, dict):
            return 0, 0
        values = [v for v in logprobs.get("token_logprobs") or [] if isinstance(v, float | int)]
        top = logprobs.get("top_logprobs") or []
        first = top[0] if top and isinstance(top[0], dict) else {}
        return len(values), len(first)

    def summarize(self, answer: StreamAnswer) -> StreamSummary:
        text, finished, prompt = "", False, 0
        for event in answer.events:
            if not isinstance(event, dict):
                continue
            choice = first_choice(event)
            if choice:
                text += choice.get("text") or ""
                finished = finished or bool(choice.get("finish_reason"))
            prompt = self.usage(event)[0] or prompt
        return StreamSummary(text, finished, prompt)

    def priority_extra(self, value: Any) -> dict[str, Any]:
        return {"priority": value}


class SGLangDialect:
    name = "sglang"
    path = "/generate"
    # SGLang's default: larger values are served first.
    high_priority = 10
    low_priority = -10
    priority_hint = ("SGLang honours it under --enable-priority-scheduling (larger first "
                     "unless --schedule-low-priority-values-first)")

    async def identify(self, client: ProbeClient, model: str | None) -> ServerInfo:
        answer = await client.get("/get_model_info")
        if not answer.ok:
            return ServerInfo(model, error=f"not an SGLang server: GET /get_model_info: "
                              f"{answer.error}")
        info = answer.data if isinstance(answer.data, dict) else {}
        path = info.get("model_path")
        if not isinstance(path, str):
            return ServerInfo(model, error="not an SGLang server: /get_model_info has no "
                              "model_path")
        return ServerInfo(model or path, _int(info.get("max_context_len")) or None)

    def body(self, model: str | None, prompt: str, max_tokens: int, *, stream: bool = False,
             logprobs: int = 0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "text": prompt, "stream": stream,
            "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0},
        }
        if logprobs:
            body.update(return_logprob=True, top_logprobs_num=logprobs)
        return {**body, **(extra or {})}

    def text(self, data: Any) -> str | None:
        text = data.get("text") if isinstance(data, dict) else None
        return text if isinstance(text, str) else None

    def usage(self, data: Any) -> tuple[int, int]:
        meta = _meta(data)
        return _int(meta.get("prompt_tokens")), _int(meta.get("cached_tokens"))

    def logprobs(self, data: Any) -> tuple[int, int]:
        meta = _meta(data)
        values = [v for v in meta.get("output_token_logprobs") or []
                  if isinstance(v, list) and v and isinstance(v[0], float | int)]
        top = meta.get("output_top_logprobs") or []
        first = top[0] if top and isinstance(top[0], list) else []
        return len(values), len(first)

    def summarize(self, answer: StreamAnswer) -> StreamSummary:
        last = next((e for e in reversed(answer.events) if isinstance(e, dict)), {})
        finished = bool(_meta(last).get("finish_reason"))
        return StreamSummary(self.text(last) or "", finished, self.usage(last)[0])

    def priority_extra(self, value: Any) -> dict[str, Any]:
        return {"priority": value}


Dialect = OpenAIDialect | SGLangDialect

DIALECTS: dict[str, type[OpenAIDialect] | type[SGLangDialect]] = {
    "openai": OpenAIDialect, "sglang": SGLangDialect,
}


def first_choice(data: Any) -> dict[str, Any] | None:
    choices = data.get("choices") if isinstance(data, dict) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return None


def _meta(data: Any) -> dict[str, Any]:
    meta = data.get("meta_info") if isinstance(data, dict) else None
    return meta if isinstance(meta, dict) else {}


async def complete(client: ProbeClient, dialect: Dialect, model: str | None, prompt: str,
                   max_tokens: int, **options: Any) -> Answer:
    return await client.post(dialect.path, dialect.body(model, prompt, max_tokens, **options))
