"""`OpenAIHTTPEngine`: any OpenAI-compatible server (vLLM, llama.cpp, a hosted API, another
progserve) through `POST /v1/completions` with `stream: true`.

Capabilities are what the protocol can honestly give:
- priority only with `send_priority` (the server is vLLM run with `--scheduling-policy
  priority`; other servers reject or ignore the field): the request's engine rank
  (`engine_rank.py`: an int, lower first) is vLLM's `priority`, lower first, as is
  (`vllm_priority`);
- no retention hints, no token ids;
- logprobs only when the server returns them: `start()` probes once with a one-token
  `echo` + `logprobs` request; prompt logprobs (`logprob_start_len >= 0`) are then read
  from a non-streamed `echo` answer, split at `usage.prompt_tokens`;
- abort closes the stream (the protocol has no abort call; servers stop on disconnect);
- a request whose caller only needs the whole answer (`GenerateRequest.stream` False) is
  one non-streamed call, yielded as a single final chunk;
- `cached_tokens` from `usage.prompt_tokens_details.cached_tokens` when the server sends it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson

from .base import Engine
from .engine_rank import clamp_rank
from .errors import EngineError, EngineUnavailableError, UnknownRequestError, UnsupportedError
from .http_client import HTTPPool, HTTPResponse, error_for_status
from .types import (
    Capabilities,
    Chunk,
    EngineStats,
    FinishReason,
    FinishType,
    GenerateRequest,
    LogprobEntry,
    ModelInfo,
)

log = logging.getLogger(__name__)


def _finish(reason: str | None, completion_tokens: int, stop_reason: Any = None) -> FinishReason:
    if reason == "length":
        return FinishReason(FinishType.LENGTH, length=completion_tokens)
    if reason == "abort":
        return FinishReason(FinishType.ABORT, message="aborted upstream")
    return FinishReason(FinishType.STOP, matched=stop_reason)


def _logprob_entries(logprobs: dict[str, Any] | None, start: int = 0,
                     end: int | None = None) -> list[LogprobEntry]:
    """OpenAI's `{tokens, token_logprobs}` -> entries. The protocol has no token ids, so
    they are -1."""
    if not logprobs:
        return []
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    return [(values[i], -1, tokens[i]) for i in range(start, min(len(tokens), end or len(tokens)))]


def vllm_priority(rank: float) -> int:
    """vLLM's `priority` (lower first, any int) for an engine rank: the rank itself."""
    return clamp_rank(rank)


def _cached_tokens(usage: dict[str, Any]) -> int:
    details = usage.get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


class OpenAIHTTPEngine(Engine):
    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        logprobs: bool | None = None,
        connect_timeout: float = 5.0,
        max_context_len: int = 8192,
        send_priority: bool = False,
    ):
        """`base_url` is the server root (`http://host:port`) or its `/v1` root.
        `logprobs=None` probes the server at start. `send_priority`: the server schedules
        by `priority` (vLLM's `--scheduling-policy priority`)."""
        root = base_url.rstrip("/")
        self.base_url = root.removesuffix("/v1")
        self._model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._logprobs = logprobs
        self._connect_timeout = connect_timeout
        self._max_context_len = max_context_len
        self._send_priority = send_priority
        self._pool: HTTPPool | None = None
        self._active: dict[str, HTTPResponse | None] = {}
        self._upstream = f"openai {self.base_url}"
        self._aborted: set[str] = set()
        self._cache_hit_tokens = 0
        self._cache_query_tokens = 0

    async def start(self) -> None:
        if self._pool is not None:
            return
        self._pool = HTTPPool(self.base_url, headers=self._headers,
                              connect_timeout=self._connect_timeout)
        try:
            if self._model is None:
                status, body = await self._pool.request("GET", "/v1/models",
                                                        timeout=self._connect_timeout)
                if status != 200:
                    raise error_for_status(status, body, self._upstream)
                models = orjson.loads(body).get("data") or []
                self._model = models[0]["id"] if models else None
            if self._logprobs is None:
                self._logprobs = await self._probe_logprobs()
        except (EngineError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("openai replica %s: startup probe failed (%s)", self.base_url, exc)
            self._logprobs = bool(self._logprobs)

    async def _probe_logprobs(self) -> bool:
        body = {"model": self._model, "prompt": "Hello world", "max_tokens": 1,
                "temperature": 0, "logprobs": 1, "echo": True}
        status, answer = await self._require_pool().request("POST", "/v1/completions",
                                                            json=body, timeout=30.0)
        if status != 200:
            return False
        choice = (orjson.loads(answer).get("choices") or [{}])[0]
        values = (choice.get("logprobs") or {}).get("token_logprobs") or []
        return len(values) >= 2  # prompt tokens came back too

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    def _require_pool(self) -> HTTPPool:
        if self._pool is None:
            raise EngineUnavailableError(f"openai replica {self.base_url} is not started")
        return self._pool

    def request_json(self, request: GenerateRequest, *, stream: bool) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {
            "model": self._model or "default",
            "prompt": request.text if request.text is not None else request.input_ids,
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if s.stop:
            body["stop"] = list(s.stop)
        if s.seed is not None:
            body["seed"] = s.seed
        if request.return_logprob:
            body["logprobs"] = max(1, request.top_logprobs_num)
            body["echo"] = request.logprob_start_len >= 0
        if self._send_priority:
            body["priority"] = vllm_priority(request.priority)
        return body

    def _check(self, request: GenerateRequest) -> None:
        s = request.sampling
        if request.return_logprob and not self._logprobs:
            raise UnsupportedError(
                f"the openai engine at {self.base_url} does not return logprobs")
        if s.regex is not None or s.json_schema is not None:
            raise UnsupportedError("the openai engine does not support regex / json_schema")
        if s.top_k not in (-1, 0) or s.stop_token_ids or s.min_new_tokens:
            raise UnsupportedError(
                "the openai engine does not support top_k, stop_token_ids or min_new_tokens")

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self._check(request)
        pool = self._require_pool()
        rid = request.rid
        self._active[rid] = None
        try:
            if request.return_logprob and request.logprob_start_len >= 0:
                yield await self._generate_with_prompt_logprobs(pool, request)
                return
            if not request.stream:
                yield await self._complete(pool, request)
                return
            async for chunk in self._stream(pool, request):
                yield chunk
        finally:
            self._active.pop(rid, None)
            self._aborted.discard(rid)

    async def _stream(self, pool: HTTPPool,
                      request: GenerateRequest) -> AsyncIterator[Chunk]:
        rid = request.rid
        upstream = self._upstream
        reason: str | None = None
        stop_reason: Any = None
        completion_tokens = 0
        usage: dict[str, Any] | None = None
        try:
            async with pool.stream("POST", "/v1/completions",
                                   json=self.request_json(request, stream=True)) as resp:
                if resp.status != 200:
                    raise error_for_status(resp.status, await resp.aread(), upstream)
                self._active[rid] = resp
                async for event in resp.aiter_sse():  # to the end: keeps the connection
                    if "error" in event:
                        raise error_for_status(400, str(event["error"]), upstream)
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or ():
                        text = choice.get("text") or ""
                        logprobs = _logprob_entries(choice.get("logprobs"))
                        completion_tokens += len(logprobs) if logprobs else (1 if text else 0)
                        reason = choice.get("finish_reason") or reason
                        stop_reason = choice.get("stop_reason", stop_reason)
                        if text or logprobs:
                            yield Chunk(rid=rid, text=text,
                                        output_logprobs=logprobs if request.return_logprob
                                        else None)
        except EngineUnavailableError:
            if rid in self._aborted:  # abort() closed the connection under us
                yield self._aborted_chunk(rid)
                return
            raise
        if rid in self._aborted:
            yield self._aborted_chunk(rid)
            return
        if reason is None:
            raise EngineUnavailableError(f"{upstream}: stream ended without a finish reason")
        # Without a usage block (a server that ignores stream_options), count what streamed.
        yield self._final(rid, reason, stop_reason, usage or {}, completion_tokens)

    def _final(self, rid: str, reason: str | None, stop_reason: Any, usage: dict[str, Any],
               streamed_tokens: int) -> Chunk:
        completion = int(usage.get("completion_tokens") or streamed_tokens)
        prompt = int(usage.get("prompt_tokens") or 0)
        cached = _cached_tokens(usage)
        self._cache_hit_tokens += cached
        self._cache_query_tokens += prompt
        return Chunk(rid=rid, finish_reason=_finish(reason, completion, stop_reason),
                     prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)

    def _aborted_chunk(self, rid: str) -> Chunk:
        return Chunk(rid=rid, finish_reason=FinishReason(FinishType.ABORT, message="aborted"))

    async def _whole_answer(self, pool: HTTPPool, request: GenerateRequest
                            ) -> dict[str, Any] | None:
        """One non-streamed `/v1/completions` answer; None when `abort` closed it."""
        rid = request.rid
        try:
            async with pool.stream("POST", "/v1/completions",
                                   json=self.request_json(request, stream=False)) as resp:
                if resp.status != 200:
                    raise error_for_status(resp.status, await resp.aread(), self._upstream)
                self._active[rid] = resp
                body = await resp.aread()
        except EngineUnavailableError:
            if rid in self._aborted:
                return None
            raise
        if rid in self._aborted:
            return None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise EngineUnavailableError(f"{self._upstream}: malformed answer: {exc}") from exc
        if not isinstance(data, dict):
            raise EngineUnavailableError(f"{self._upstream}: unexpected answer {data!r:.200}")
        return data

    async def _complete(self, pool: HTTPPool, request: GenerateRequest) -> Chunk:
        """The whole answer as one final chunk (the caller does not stream)."""
        data = await self._whole_answer(pool, request)
        if data is None:
            return self._aborted_chunk(request.rid)
        choice = (data.get("choices") or [{}])[0]
        reason = choice.get("finish_reason")
        if reason is None:
            raise EngineUnavailableError(f"{self._upstream}: answer without a finish reason")
        text = choice.get("text") or ""
        logprobs = _logprob_entries(choice.get("logprobs")) if request.return_logprob else None
        # Without a usage block, count what can be counted (as the stream does).
        counted = len(logprobs) if logprobs else (1 if text else 0)
        chunk = self._final(request.rid, reason, choice.get("stop_reason"),
                            data.get("usage") or {}, counted)
        chunk.text = text
        chunk.output_logprobs = logprobs
        return chunk

    async def _generate_with_prompt_logprobs(self, pool: HTTPPool,
                                             request: GenerateRequest) -> Chunk:
        data = await self._whole_answer(pool, request)
        if data is None:
            return self._aborted_chunk(request.rid)
        choice = (data.get("choices") or [{}])[0]
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        logprobs = choice.get("logprobs")
        start = max(0, request.logprob_start_len)
        prompt_text = "".join((logprobs or {}).get("tokens", [])[:prompt_tokens])
        text = choice.get("text") or ""
        if prompt_text and text.startswith(prompt_text):
            text = text[len(prompt_text):]  # echo: the answer starts with the prompt
        chunk = self._final(request.rid, choice.get("finish_reason"),
                            choice.get("stop_reason"), usage, 0)
        chunk.text = text
        chunk.input_logprobs = _logprob_entries(logprobs, start, prompt_tokens)
        chunk.output_logprobs = _logprob_entries(logprobs, prompt_tokens)
        return chunk

    async def abort(self, rid: str) -> None:
        if rid not in self._active:
            raise UnknownRequestError(f"no running request {rid!r} on {self.base_url}")
        self._aborted.add(rid)
        resp = self._active.get(rid)
        if resp is not None:
            resp.close()  # the protocol has no abort call: servers stop on disconnect

    async def health(self) -> bool:
        if self._pool is None:
            return False
        try:
            status, _ = await self._pool.request("GET", "/v1/models",
                                                 timeout=self._connect_timeout)
        except EngineError:
            return False
        return status == 200

    async def stats(self) -> EngineStats:
        return EngineStats(
            queue_len=0,
            running=len(self._active),
            kv_used_tokens=0,
            kv_capacity_tokens=0,
            cache_hit_tokens=self._cache_hit_tokens,
            cache_query_tokens=self._cache_query_tokens,
        )

    def capabilities(self) -> Capabilities:
        return Capabilities(priority=self._send_priority, logprobs=bool(self._logprobs),
                            constrained_decoding=False, token_ids=False, retention=False,
                            abort=True)

    def model_info(self) -> ModelInfo:
        return ModelInfo(model_path=self._model or self.base_url,
                         max_context_len=self._max_context_len)
