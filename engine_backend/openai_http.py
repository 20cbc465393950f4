"""`OpenAIHTTPEngine`: any OpenAI-compatible server (vLLM, llama.cpp, a hosted API, another
progserve).

- Chat calls (`GenerateRequest.chat`) go to `/v1/chat/completions` with their messages,
  tools and `tool_choice`: the upstream renders them with the model's own template.
  Everything else goes to `/v1/completions` with `text`.
- Streams ask for usage (`stream_options.include_usage`, plus `continuous_usage_stats`
  where the upstream has it: exact counts on every chunk). Counts the upstream does not
  give are counted (`http/token_count.py`: a local tokenizer, else the upstream's tokenize
  route); a prompt nothing can count is estimated, never reported as 0 tokens.
- A stream the upstream ends without a finish reason (llama-cpp-python cuts a running
  stream short when another request waits) is not a failure of the replica: the call
  resumes on it with its prompt plus the output so far and the rest of `max_new_tokens`
  (a chat answer continues where the upstream can continue one: vLLM's
  `continue_final_message`), or, when nothing was delivered yet, is sent again. Each cut
  counts as an engine-side preemption in `stats()`. Where the call cannot resume, it
  fails with `StreamInterruptedError` (503); the replica stays up.
- A stream that breaks (the replica died) raises `EngineUnavailableError` with the output
  tokens it had delivered, so the scheduler resumes it elsewhere for the rest of
  `max_new_tokens` only; when those cannot be counted without the dead replica, or a chat
  answer cannot be continued, the error says the call must not resume.
- Prefill only (`max_new_tokens` 0: `fork`'s shared prefix, `select`'s scoring): the
  protocol has no such call (vLLM rejects `max_tokens: 0`, llama.cpp reads it as
  unlimited), so one token is generated and dropped.
- `cache_salt` carries the tenant's cache salt where the upstream isolates prefix caching
  by it (vLLM; `http_engine.cache_salt`). What the upstream can do is probed at start
  (`openai_upstream.py`).
- Logprobs and their top alternatives when the server returns them; prompt logprobs
  (`logprob_start_len >= 0`) from a non-streamed `echo` answer, split at
  `usage.prompt_tokens`. No retention hints, no token ids. Abort closes the
  stream (the protocol has no abort call; servers stop on disconnect). A request whose
  caller only needs the whole answer (`stream` False) is one non-streamed call.
- Priority only with `send_priority` (the server is vLLM run with `--scheduling-policy
  priority`; other servers reject or ignore the field): the request's engine rank
  (`engine_rank.py`: an int, lower first) is vLLM's `priority`, lower first, as is
  (`vllm_priority`).
- Constrained decoding (a `regex` or `json_schema`: the DSL's select and JSON outputs, a
  forced tool call) as vLLM's `structured_outputs`; other upstreams have no such field,
  so such a request is refused there (`Capabilities.constrained_decoding` says which).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from .errors import (
    EngineError,
    EngineUnavailableError,
    StreamInterruptedError,
    UnsupportedError,
    UpstreamProtocolError,
)
from .http.client import HTTPClient
from .http.engine import HTTPEngine
from .http.errors import error_for_status
from .http.token_count import LocalTokenizer, TokenCounter, estimate_tokens
from .http.transport import Transport
from .openai_protocol import (
    ToolCallText,
    WireOptions,
    cached_tokens,
    chat_body,
    chat_logprobs,
    completion_body,
    completion_logprobs,
    finish_reason,
    message_text,
)
from .openai_upstream import UpstreamFeatures, probe_upstream, remote_count
from .types import (
    Capabilities,
    Chunk,
    FinishReason,
    FinishType,
    GenerateRequest,
    LogprobEntry,
    ModelInfo,
)

log = logging.getLogger(__name__)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MAX_RESUMES = 8  # cuts of one call the engine resumes before it gives up


@dataclass(slots=True)
class _Output:
    """One call's output across the upstream streams that served it (a cut stream is
    resumed by another one)."""

    pieces: list[str] = field(default_factory=list)
    chars: int = 0
    events: int = 0  # content events: the count of last resort
    base_tokens: int = 0  # delivered by the streams before this one
    stream_chars: int = 0
    stream_tokens: int | None = None  # this stream's, from usage or logprobs per chunk
    prompt_tokens: int = 0  # the original prompt's, once the upstream said
    cached_tokens: int = 0
    usage: dict[str, Any] | None = None  # this stream's last usage block
    reason: str | None = None
    stop_reason: Any = None
    resumes: int = 0
    tools: ToolCallText | None = None  # a chat stream's tool calls, as they come

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def new_stream(self) -> None:
        self.stream_chars, self.stream_tokens, self.usage = 0, None, None

    def add(self, text: str, logprob_tokens: int) -> None:
        if text:
            self.pieces.append(text)
            self.chars += len(text)
            self.stream_chars += len(text)
        if logprob_tokens:
            self.stream_tokens = (self.stream_tokens or 0) + logprob_tokens
        self.events += logprob_tokens or (1 if text else 0)

    def take_usage(self, usage: dict[str, Any], first_stream: bool) -> None:
        self.usage = usage
        if usage.get("completion_tokens") is not None:
            self.stream_tokens = int(usage["completion_tokens"])
        if first_stream and usage.get("prompt_tokens"):
            self.prompt_tokens = int(usage["prompt_tokens"])
        self.cached_tokens = cached_tokens(usage)

    def delivered_tokens(self) -> int | None:
        """Output tokens delivered so far, when known exactly."""
        if not self.stream_chars:
            return self.base_tokens
        if self.stream_tokens is None:
            return None
        return self.base_tokens + self.stream_tokens


class OpenAIHTTPEngine(HTTPEngine):
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
        cache_salt: Literal["auto", "on", "off"] = "auto",
        tokenizer: Path | None = None,
        transport: Transport | None = None,
        send_priority: bool = False,
    ):
        """`base_url` is the server root (`http://host:port`) or its `/v1` root.
        `logprobs=None` probes the server at start. `tokenizer`: a directory with the
        model's `tokenizer.json`, to count what the upstream does not."""
        super().__init__(base_url.rstrip("/").removesuffix("/v1"), api_key=api_key,
                         connect_timeout=connect_timeout, transport=transport)
        self.features = UpstreamFeatures(model=model)
        self._logprobs_setting = logprobs
        self._cache_salt_setting = cache_salt
        self._tokenizer_path = tokenizer
        self._max_context_len = max_context_len
        self._send_priority = send_priority
        self._aborted: set[str] = set()
        self._wire = WireOptions(model=model or "default", priority=send_priority)
        self.counter = TokenCounter()
        self._model_info = self._describe_model()

    async def on_start(self) -> None:
        features = self.features
        try:
            await probe_upstream(self, features, logprobs=self._logprobs_setting)
        except (EngineError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("openai replica %s: startup probe failed (%s)", self.base_url, exc)
            features.logprobs = bool(self._logprobs_setting)
        salt = self._cache_salt_setting == "on" or \
            (self._cache_salt_setting == "auto" and features.vllm)
        self._wire = WireOptions(model=features.model or "default",
                                 continuous_usage=features.continuous_usage,
                                 cache_salt=salt, continue_chat=features.vllm,
                                 priority=self._send_priority, structured=features.vllm)
        local = LocalTokenizer.load(self._tokenizer_path) if self._tokenizer_path else None
        remote = (lambda text: remote_count(self, features, text)) if features.tokenize else None
        self.counter = TokenCounter(local, remote)
        self._model_info = self._describe_model()
        log.info("openai replica %s: model %s, %s; usage per chunk %s, cache salt %s, chat "
                 "continuation %s, token counts by %s", self.base_url, features.model,
                 "vLLM" if features.vllm else "not vLLM", features.continuous_usage, salt,
                 self._wire.continue_chat,
                 "a local tokenizer" if local else (features.tokenize or "nothing"))

    # ------------------------------------------------------------------ requests

    def request_json(self, request: GenerateRequest, *, stream: bool,
                     output: _Output | None = None) -> tuple[str, dict[str, Any]]:
        """(route, body) for `request`, resumed after `output` if given."""
        s = request.sampling
        done = output.base_tokens if output is not None else 0
        so_far = output.text if output is not None else ""
        max_tokens = max(1, s.max_new_tokens - done)  # never 0: see the module docstring
        if request.chat is not None:
            return CHAT, chat_body(request, self._wire, max_tokens=max_tokens, stream=stream,
                                   answer_so_far=request.chat.assistant_prefix + so_far)
        prompt = request.text + so_far if request.text is not None else request.input_ids
        return COMPLETIONS, completion_body(request, self._wire, prompt=prompt,  # type: ignore[arg-type]
                                            max_tokens=max_tokens, stream=stream)

    def _check(self, request: GenerateRequest) -> None:
        s = request.sampling
        if request.return_logprob and not self.features.logprobs:
            raise UnsupportedError(
                f"the openai engine at {self.base_url} does not return logprobs")
        if (s.regex is not None or s.json_schema is not None) and not self._wire.structured:
            raise UnsupportedError(f"{self.upstream} cannot constrain decoding (regex / "
                                   "json_schema): vLLM's structured outputs can")
        if s.top_k not in (-1, 0) or s.stop_token_ids or s.min_new_tokens:
            raise UnsupportedError(
                "the openai engine does not support top_k, stop_token_ids or min_new_tokens")
        if request.chat is not None and request.chat.assistant_prefix and \
                not self._wire.continue_chat:
            raise UpstreamProtocolError(
                f"{self.upstream} cannot continue a partial chat answer (a resumed call)")

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self._check(request)
        client = self.require_client()
        rid = request.rid
        self.running[rid] = None
        try:
            if request.return_logprob and request.logprob_start_len >= 0 and \
                    request.chat is None:
                yield await self._with_prompt_logprobs(client, request)
            elif not request.stream or request.sampling.max_new_tokens == 0:
                yield await self._complete(client, request)
            else:
                async for chunk in self._stream(client, request):
                    yield chunk
        finally:
            self.running.pop(rid, None)
            self._aborted.discard(rid)

    # ------------------------------------------------------------------ streams

    async def _stream(self, client: HTTPClient, request: GenerateRequest
                      ) -> AsyncIterator[Chunk]:
        rid = request.rid
        output = _Output()
        while True:
            try:
                async for chunk in self._stream_once(client, request, output):
                    yield chunk
            except EngineUnavailableError as exc:
                if rid in self._aborted:  # abort() closed the connection under us
                    yield self._aborted_chunk(rid)
                    return
                raise await self._lost(request, output, exc) from exc
            if rid in self._aborted:
                yield self._aborted_chunk(rid)
                return
            if output.reason is None:
                await self._resume_after_cut(request, output)
            if output.reason is not None:
                yield await self._final(request, output)
                return

    async def _stream_once(self, client: HTTPClient, request: GenerateRequest,
                           output: _Output) -> AsyncIterator[Chunk]:
        route, body = self.request_json(request, stream=True, output=output)
        first = output.resumes == 0
        async with client.stream("POST", route, json=body) as resp:
            if resp.status != 200:
                raise error_for_status(resp.status, await resp.aread(), self.upstream,
                                       route=route)
            self.running[request.rid] = resp
            output.new_stream()
            async for event in resp.aiter_sse():  # to the end: keeps the connection
                chunk = self._chunk_from_event(request, event, output, first)
                if chunk is not None:
                    yield chunk

    def _chunk_from_event(self, request: GenerateRequest, event: dict[str, Any],
                          output: _Output, first_stream: bool) -> Chunk | None:
        if "error" in event:
            raise error_for_status(400, str(event["error"]), self.upstream)
        if event.get("usage"):
            output.take_usage(event["usage"], first_stream)
        choices = event.get("choices")
        if not choices:
            return None
        choice = choices[0]
        if request.chat is not None:
            delta = choice.get("delta") or {}
            text = delta.get("content") or ""
            if delta.get("tool_calls"):
                output.tools = output.tools or ToolCallText()
                text += output.tools.feed(delta["tool_calls"])
            entries, tops = chat_logprobs(choice.get("logprobs"))
        else:
            text = choice.get("text") or ""
            entries, tops = completion_logprobs(choice.get("logprobs"))
        if choice.get("finish_reason"):
            output.reason = choice["finish_reason"]
            output.stop_reason = choice.get("stop_reason")
            if output.tools is not None:
                text += output.tools.close()
        output.add(text, len(entries))
        if not (text or entries):
            return None
        return Chunk(rid=request.rid, text=text, **self._logprob_fields(request, entries, tops),
                     completion_tokens=output.delivered_tokens() or 0,
                     prompt_tokens=output.prompt_tokens)

    @staticmethod
    def _logprob_fields(request: GenerateRequest, entries: list[LogprobEntry],
                        tops: list[list[LogprobEntry]] | None) -> dict[str, Any]:
        if not request.return_logprob:
            return {}
        return {"output_logprobs": entries,
                "output_top_logprobs": tops if request.top_logprobs_num else None}

    async def _resume_after_cut(self, request: GenerateRequest, output: _Output) -> None:
        """The stream ended without a finish reason: the upstream cut it short to serve
        another request. Make `output` ready for the next stream on this replica, or raise
        StreamInterruptedError when the call cannot go on here."""
        if output.resumes >= MAX_RESUMES:
            raise StreamInterruptedError(
                f"{self.upstream}: the stream was cut short {output.resumes + 1} times")
        output.resumes += 1
        if not output.chars:  # nothing delivered: send it again as it was
            self.count_preemption(output.prompt_tokens)
            return
        why = None
        if request.chat is not None and not self._wire.continue_chat:
            why = "it cannot continue a partial chat answer"
        elif request.text is None:
            why = "a token-id prompt cannot be extended with text"
        tokens = output.delivered_tokens()
        if tokens is None and why is None:
            tokens = await self.counter.count(output.text)
            if tokens is None:
                why = "the tokens delivered cannot be counted (no usage per chunk, no " \
                      "tokenize route, no local tokenizer: http_engine.tokenizer)"
        if why is not None:
            raise StreamInterruptedError(
                f"{self.upstream} ended the stream without a finish reason after "
                f"{output.chars} characters (it cuts a stream short when another request "
                f"waits) and the call cannot resume: {why}")
        assert tokens is not None
        output.base_tokens = tokens
        if tokens >= request.sampling.max_new_tokens:
            output.reason = "length"
        self.count_preemption(output.prompt_tokens + tokens)
        log.info("%s cut the stream of %s after %d tokens: resumed there (cut %d)",
                 self.upstream, request.rid, tokens, output.resumes)

    async def _lost(self, request: GenerateRequest, output: _Output,
                    exc: EngineUnavailableError) -> EngineUnavailableError:
        """The replica failed mid-call: an error naming it, with what the scheduler needs
        to resume the call elsewhere for the rest of its tokens (or that it must not)."""
        message = str(exc) if str(exc).startswith(self.upstream) else f"{self.upstream}: {exc}"
        if not output.chars:
            return EngineUnavailableError(message, prompt_tokens=output.prompt_tokens)
        tokens = output.delivered_tokens()
        local = self.counter.local
        if tokens is None and local is not None:
            tokens = await local.count(output.text)
        prompt = output.prompt_tokens
        if not prompt and local is not None and request.text is not None:
            prompt = await local.count(request.text)
        why = None
        if request.chat is not None and not self._wire.continue_chat:
            why = "the upstream cannot continue a partial chat answer"
        elif tokens is None:
            why = "the tokens it delivered cannot be counted without the upstream (no " \
                  "usage per chunk; set http_engine.tokenizer)"
        if why is not None:
            return EngineUnavailableError(f"{message}; the call cannot resume on another "
                                          f"replica: {why}", resumable=False)
        return EngineUnavailableError(message, delivered_tokens=tokens or 0,
                                      prompt_tokens=prompt)

    # ------------------------------------------------------------------ final counts

    async def _final(self, request: GenerateRequest, output: _Output) -> Chunk:
        usage = output.usage or {}
        if usage.get("completion_tokens") is not None:
            completion = output.base_tokens + int(usage["completion_tokens"])
        else:
            completion = output.delivered_tokens()
            if completion is None:
                counted = await self.counter.count(output.text)
                completion = output.events if counted is None else counted
        prompt = output.prompt_tokens or await self._count_prompt(request)
        cached = min(output.cached_tokens, prompt)
        self.count_prompt(prompt, cached)
        return Chunk(rid=request.rid,
                     finish_reason=finish_reason(output.reason, completion, output.stop_reason),
                     prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)

    async def _count_prompt(self, request: GenerateRequest) -> int:
        """The prompt's tokens when the upstream did not say: counted, else estimated."""
        if request.input_ids is not None:
            return len(request.input_ids)
        count = None
        if request.chat is not None and self.features.tokenize == "vllm":
            count = await remote_count(self, self.features, messages=request.chat.messages)
        if count is None:
            count = await self.counter.count(request.text or "")
        return count or estimate_tokens(request.text or "")

    def _aborted_chunk(self, rid: str) -> Chunk:
        return Chunk(rid=rid, finish_reason=FinishReason(FinishType.ABORT, message="aborted"))

    # ------------------------------------------------------------------ whole answers

    async def _whole_answer(self, client: HTTPClient, request: GenerateRequest
                            ) -> dict[str, Any] | None:
        """One non-streamed answer; None when `abort` closed it."""
        rid = request.rid
        route, body = self.request_json(request, stream=False)
        try:
            resp = await client.send("POST", route, body)
            try:
                if resp.status != 200:
                    raise error_for_status(resp.status, await resp.aread(), self.upstream,
                                           route=route)
                self.running[rid] = resp
                data = await resp.aread()
            finally:
                resp.release()
        except EngineUnavailableError as exc:
            if rid in self._aborted:
                return None
            if str(exc).startswith(self.upstream):
                raise
            raise EngineUnavailableError(f"{self.upstream}: {exc}") from exc
        if rid in self._aborted:
            return None
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise EngineUnavailableError(f"{self.upstream}: malformed answer: {exc}") from exc
        if not isinstance(answer, dict):
            raise EngineUnavailableError(f"{self.upstream}: unexpected answer {answer!r:.200}")
        return answer

    async def _complete(self, client: HTTPClient, request: GenerateRequest) -> Chunk:
        """The whole answer as one final chunk (the caller does not stream). Prefill only:
        the one token generated is dropped."""
        data = await self._whole_answer(client, request)
        if data is None:
            return self._aborted_chunk(request.rid)
        choice = (data.get("choices") or [{}])[0]
        output = _Output(reason=choice.get("finish_reason"),
                         stop_reason=choice.get("stop_reason"))
        if output.reason is None:
            raise EngineUnavailableError(f"{self.upstream}: answer without a finish reason")
        if request.chat is not None:
            text = message_text(choice.get("message") or {})
            entries, tops = chat_logprobs(choice.get("logprobs"))
        else:
            text = choice.get("text") or ""
            entries, tops = completion_logprobs(choice.get("logprobs"))
        output.add(text, len(entries))
        output.take_usage(data.get("usage") or {}, True)
        if request.sampling.max_new_tokens == 0:
            return await self._prefill_only(request, output)
        chunk = await self._final(request, output)
        chunk.text = text
        if request.return_logprob:
            for name, value in self._logprob_fields(request, entries, tops).items():
                setattr(chunk, name, value)
        return chunk

    async def _prefill_only(self, request: GenerateRequest, output: _Output) -> Chunk:
        output.pieces, output.usage, output.stream_chars = [], {"completion_tokens": 0}, 0
        output.reason = "length"
        return await self._final(request, output)

    async def _with_prompt_logprobs(self, client: HTTPClient, request: GenerateRequest
                                    ) -> Chunk:
        data = await self._whole_answer(client, request)
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
        prefill_only = request.sampling.max_new_tokens == 0
        output = _Output(reason="length" if prefill_only else choice.get("finish_reason"),
                         stop_reason=choice.get("stop_reason"))
        output.take_usage({**usage, "completion_tokens": 0} if prefill_only else usage, True)
        chunk = await self._final(request, output)
        chunk.input_logprobs, chunk.input_top_logprobs = completion_logprobs(
            logprobs, start, prompt_tokens)
        if not prefill_only:
            chunk.text = text
            chunk.output_logprobs, chunk.output_top_logprobs = completion_logprobs(
                logprobs, prompt_tokens)
        if not request.top_logprobs_num:
            chunk.input_top_logprobs = chunk.output_top_logprobs = None
        return chunk

    # ------------------------------------------------------------------ control

    async def abort(self, rid: str) -> None:
        resp = self.running_request(rid)
        self._aborted.add(rid)
        if resp is not None:
            resp.close()  # the protocol has no abort call: servers stop on disconnect

    async def health(self) -> bool:
        return await self.answers("GET", "/v1/models")

    def capabilities(self) -> Capabilities:
        return Capabilities(priority=self._send_priority, logprobs=self.features.logprobs,
                            constrained_decoding=self._wire.structured, token_ids=False,
                            retention=False, abort=True, chat=True)

    def _describe_model(self) -> ModelInfo:
        return ModelInfo(model_path=self.features.model or self.base_url,
                         max_context_len=self.features.max_context_len or self._max_context_len)

    def model_info(self) -> ModelInfo:
        return self._model_info
