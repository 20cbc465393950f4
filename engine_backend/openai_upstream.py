"""What an OpenAI-compatible upstream can do beyond the standard API, learned at start-up
(`probe_upstream`): its model, whether it is vLLM, returns logprobs, reports usage on
every streamed chunk, and how it counts tokens.

- vLLM (`owned_by: "vllm"` in `/v1/models`) honours `cache_salt`, continues a partial
  answer with `continue_final_message`, and tokenizes prompts and chats at `/tokenize`.
- Usage on every chunk (`stream_options.continuous_usage_stats`, vLLM and SGLang) is
  probed with a two-token stream: it gives exact token counts mid-stream for free.
- Tokenize routes tried on other servers: llama.cpp's `/tokenize`, llama-cpp-python's
  `/extras/tokenize`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson

from .errors import EngineError

if TYPE_CHECKING:
    from .openai_http import OpenAIHTTPEngine

log = logging.getLogger(__name__)

TokenizeRoute = Literal["vllm", "llama.cpp", "llama-cpp-python"]
_PROBE_TIMEOUT_S = 30.0


@dataclass(slots=True)
class UpstreamFeatures:
    model: str | None = None
    vllm: bool = False
    max_context_len: int | None = None
    logprobs: bool = False
    continuous_usage: bool = False
    tokenize: TokenizeRoute | None = None


async def probe_upstream(engine: OpenAIHTTPEngine, features: UpstreamFeatures, *,
                         logprobs: bool | None) -> None:
    """Fill `features` from the upstream; each probe that fails leaves its default."""
    try:
        await _read_models(engine, features)
    except (EngineError, ValueError, TypeError, AttributeError) as exc:
        log.warning("%s: GET /v1/models failed (%s)", engine.upstream, exc)
    features.logprobs = await _probe_logprobs(engine, features) if logprobs is None \
        else logprobs
    features.continuous_usage = await _probe_continuous_usage(engine, features)
    features.tokenize = "vllm" if features.vllm else await _probe_tokenize(engine)


async def _read_models(engine: OpenAIHTTPEngine, features: UpstreamFeatures) -> None:
    data = await engine.call_json("GET", "/v1/models")
    models = (data.get("data") or []) if isinstance(data, dict) else []
    mine = next((m for m in models if m.get("id") == features.model), None) or \
        (models[0] if models else {})
    if features.model is None:
        features.model = mine.get("id")
    features.vllm = mine.get("owned_by") == "vllm"
    if mine.get("max_model_len"):
        features.max_context_len = int(mine["max_model_len"])


async def _post(engine: OpenAIHTTPEngine, path: str, body: dict[str, Any]) -> Any:
    """The JSON answer to a probe, or None when the upstream refused it."""
    try:
        status, answer = await engine.call("POST", path, body, timeout=_PROBE_TIMEOUT_S)
    except EngineError:
        return None
    if status != 200:
        return None
    try:
        return orjson.loads(answer)
    except orjson.JSONDecodeError:
        return answer  # a stream


async def _probe_logprobs(engine: OpenAIHTTPEngine, features: UpstreamFeatures) -> bool:
    """A one-token `echo` with logprobs: prompt tokens come back too."""
    answer = await _post(engine, "/v1/completions", {
        "model": features.model, "prompt": "Hello world", "max_tokens": 1, "temperature": 0,
        "logprobs": 1, "echo": True})
    if not isinstance(answer, dict):
        return False
    choice = (answer.get("choices") or [{}])[0]
    values = (choice.get("logprobs") or {}).get("token_logprobs") or []
    return len(values) >= 2


async def _probe_continuous_usage(engine: OpenAIHTTPEngine,
                                  features: UpstreamFeatures) -> bool:
    """A two-token stream: does a chunk before the last carry usage?"""
    answer = await _post(engine, "/v1/completions", {
        "model": features.model, "prompt": "Hello", "max_tokens": 2, "temperature": 0,
        "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    if not isinstance(answer, bytes):
        return False
    for line in answer.split(b"\n"):
        try:
            event = orjson.loads(line[5:]) if line.startswith(b"data:") else None
        except orjson.JSONDecodeError:
            continue  # [DONE]
        if isinstance(event, dict) and event.get("usage") and any(
                choice.get("finish_reason") is None for choice in event.get("choices") or ()):
            return True
    return False


async def _probe_tokenize(engine: OpenAIHTTPEngine) -> TokenizeRoute | None:
    if isinstance(await _post(engine, "/tokenize", {"content": "Hello"}), dict):
        return "llama.cpp"
    if isinstance(await _post(engine, "/extras/tokenize", {"input": "Hello"}), dict):
        return "llama-cpp-python"
    return None


async def remote_count(engine: OpenAIHTTPEngine, features: UpstreamFeatures,
                       text: str | None = None,
                       messages: list[dict[str, Any]] | None = None) -> int | None:
    """Tokens in `text` (or, on vLLM, in `messages` rendered by the model's template) by
    the upstream's tokenize route; None when it has none or refuses."""
    route = features.tokenize
    if route == "vllm":
        body: dict[str, Any] = {"model": features.model}
        body.update({"messages": messages, "add_generation_prompt": True} if messages
                    else {"prompt": text, "add_special_tokens": False})
        answer = await _post(engine, "/tokenize", body)
    elif messages is not None or route is None:
        return None
    elif route == "llama.cpp":
        answer = await _post(engine, "/tokenize", {"content": text})
    else:
        answer = await _post(engine, "/extras/tokenize", {"input": text})
    if not isinstance(answer, dict):
        return None
    if "count" in answer:
        return int(answer["count"])
    tokens = answer.get("tokens")
    return len(tokens) if isinstance(tokens, list) else None
