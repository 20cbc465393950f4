"""`SGLangHTTPEngine`: one SGLang server replica, driven through its native HTTP API.

- `POST /generate` with `stream: true`. SGLang's events carry the *cumulative* text (and,
  by default, cumulative `output_ids`); they are turned into delta `Chunk`s here. A request
  whose caller only needs the whole answer (`GenerateRequest.stream` False) is one
  non-streamed `/generate`, yielded as a single final chunk (no SSE on either side).
  A prefill-only call (`max_new_tokens` 0) is sent as it is: SGLang supports it.
- `rid` is passed through, so `abort(rid)` can `POST /abort_request`. Closing the stream
  early (the consumer stopped) also aborts upstream: SGLang aborts on disconnect and an
  explicit abort is sent as well.
- `priority`: the request's engine rank (`engine_rank.py`: an int, lower first) as SGLang's
  int32 `priority` (`sglang_priority`). Under `--enable-priority-scheduling` SGLang serves
  *larger* values first unless the server runs `--schedule-low-priority-values-first`
  (`SchedulePolicy.priority_sign` in `srt/managers/schedule_policy.py`), so the rank is
  sent negated, or as is for low-values-first servers: order-preserving, never clamped.
- `cached_tokens`, `prompt_tokens`, `completion_tokens`, the finish reason and the
  (top) logprobs come from `meta_info`.
- A tenant's cache salt (`GenerateRequest.cache_salt`) goes in the request field SGLang
  keys its radix cache with: `cache_salt` (current SGLang), `extra_key` (older servers),
  or none (`http_engine.sglang_cache_salt_field`).
- Start-up asks `/get_model_info`; a server that answers 404 there does not speak SGLang's
  protocol (a vLLM or llama.cpp server, say) and start-up fails naming it. A 404 from
  `/generate` later is a 502 naming the upstream, never an unknown request.
- KV retention hints (with a `priority_writer`, `settings.http_engine.sglang_priority_file`):
  `retain` and `program_ended` go into the priority file that progserve's SGLang plugin
  reads (`priority_file.py`), and the upstream rid names the request's program
  (`priority_file.program_rid`), which is how the plugin attributes the KV it inserts.

One instance per replica URL. Any server speaking this protocol works, progserve's own
`/generate` included.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

import orjson

from .engine_rank import clamp_rank
from .errors import (
    EngineError,
    EngineUnavailableError,
    InvalidRequestError,
    UpstreamProtocolError,
)
from .http.engine import HTTPEngine
from .http.errors import error_for_status
from .http.transport import Transport
from .priority_file import program_rid
from .sglang_priority_writer import ProgramPriorityWriter
from .types import (
    Capabilities,
    Chunk,
    FinishReason,
    FinishType,
    GenerateRequest,
    LogprobEntry,
    ModelInfo,
    SamplingParams,
)

log = logging.getLogger(__name__)



def finish_reason_from_json(value: Any) -> FinishReason | None:
    """SGLang's `meta_info.finish_reason` (a dict, or a bare string in old versions)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = {"type": value}
    kind = str(value.get("type", "stop"))
    if kind == "length":
        return FinishReason(FinishType.LENGTH, length=value.get("length"))
    if kind == "abort":
        return FinishReason(FinishType.ABORT, message=value.get("message"))
    return FinishReason(FinishType.STOP, matched=value.get("matched"))


def logprobs_from_json(entries: Any) -> list[LogprobEntry]:
    """`[[logprob, token_id, text], ...]` -> entries; SGLang gives None for the first
    prompt token's logprob."""
    out: list[LogprobEntry] = []
    for entry in entries or ():
        logprob, token_id = entry[0], entry[1]
        text = entry[2] if len(entry) > 2 else None
        out.append((logprob, int(token_id), text))  # type: ignore[arg-type]
    return out


def top_logprobs_from_json(positions: Any) -> list[list[LogprobEntry]]:
    """`[[[logprob, token_id, text], ...] or None, ...]`, one list per position."""
    return [logprobs_from_json(entries) for entries in positions or ()]


def sampling_to_json(sampling: SamplingParams) -> dict[str, Any]:
    params: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "ignore_eos": sampling.ignore_eos,
    }
    # Optional fields only when set, so older servers that lack them still accept the call.
    if sampling.min_new_tokens:
        params["min_new_tokens"] = sampling.min_new_tokens
    if sampling.stop:
        params["stop"] = list(sampling.stop)
    if sampling.stop_token_ids:
        params["stop_token_ids"] = list(sampling.stop_token_ids)
    if sampling.regex is not None:
        params["regex"] = sampling.regex
    if sampling.json_schema is not None:
        params["json_schema"] = sampling.json_schema
    if sampling.seed is not None:
        params["sampling_seed"] = sampling.seed
    return params


class _Progress:
    """Turns SGLang's cumulative stream fields into deltas."""

    __slots__ = ("text_len", "ids_len", "logprobs_len", "top_len")

    def __init__(self) -> None:
        self.text_len = 0
        self.ids_len = 0
        self.logprobs_len = 0
        self.top_len = 0

    def delta_text(self, text: str) -> str:
        delta = text[self.text_len:]
        self.text_len = len(text)
        return delta

    def delta_list(self, items: list[Any], attr: str, total: int) -> list[Any]:
        """A list field is cumulative when its length equals the completion-token count
        so far (SGLang's default); otherwise the server streams it incrementally."""
        seen = getattr(self, attr)
        if len(items) == total and len(items) >= seen:
            setattr(self, attr, len(items))
            return items[seen:]
        setattr(self, attr, seen + len(items))
        return items


class SGLangHTTPEngine(HTTPEngine):
    name = "sglang"

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        send_priority: bool = True,
        low_priority_values_first: bool = False,
        model_path: str | None = None,
        connect_timeout: float = 5.0,
        priority_writer: ProgramPriorityWriter | None = None,
        cache_salt_field: Literal["cache_salt", "extra_key", "off"] = "cache_salt",
        transport: Transport | None = None,
    ):
        super().__init__(base_url, api_key=api_key, connect_timeout=connect_timeout,
                         transport=transport)
        self._send_priority = send_priority
        self._low_first = low_priority_values_first
        self._model_info = ModelInfo(model_path=model_path or self.base_url)
        self._writer = priority_writer
        self._salt_field = None if cache_salt_field == "off" else cache_salt_field
        self._background: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- lifecycle

    async def on_start(self) -> None:
        try:
            await self._load_model_info()
        except UpstreamProtocolError:
            raise
        except (EngineError, ValueError, TypeError, AttributeError) as exc:
            log.warning("sglang replica %s: no model info yet (%s)", self.base_url, exc)

    async def on_close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._writer is not None:
            await self._writer.aclose()

    async def _load_model_info(self) -> None:
        status, body = await self.call("GET", "/get_model_info")
        if status == 404:
            raise UpstreamProtocolError(
                f"{self.upstream} does not speak SGLang's native protocol: GET /get_model_info "
                "answered 404 (an OpenAI-compatible server needs --engine openai)")
        if status != 200:
            raise error_for_status(status, body, self.upstream)
        info = orjson.loads(body)
        max_len = self._model_info.max_context_len
        try:
            server = await self.call_json("GET", "/get_server_info")
            max_len = int(server.get("context_length") or server.get("max_context_len")
                          or max_len)
            self._kv_capacity = int(server.get("max_total_num_tokens") or 0)
        except (EngineError, ValueError, TypeError, AttributeError):
            pass  # optional: older servers or proxies without it
        self._model_info = ModelInfo(
            model_path=str(info.get("model_path") or self._model_info.model_path),
            tokenizer_path=info.get("tokenizer_path"),
            is_generation=bool(info.get("is_generation", True)),
            max_context_len=max_len,
            chat_template=info.get("chat_template"),
        )

    # ---------------------------------------------------------------- generate

    def sglang_priority(self, rank: float) -> int:
        """SGLang's `priority` for an engine rank: `-rank`, or `rank` on a server that runs
        `--schedule-low-priority-values-first`; both within int32."""
        rank = clamp_rank(rank)
        return rank if self._low_first else -rank

    def upstream_rid(self, request: GenerateRequest) -> str:
        """The rid sent to SGLang: with retention hints on, it names the program."""
        if self._writer is None or not request.program_id:
            return request.rid
        return program_rid(request.program_id, request.rid)

    def request_json(self, request: GenerateRequest, rid: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "rid": rid or request.rid,
            "sampling_params": sampling_to_json(request.sampling),
            "stream": request.stream,
        }
        if request.text is not None:
            body["text"] = request.text
        else:
            body["input_ids"] = request.input_ids
        if request.return_logprob:
            body.update(
                return_logprob=True,
                logprob_start_len=request.logprob_start_len,
                top_logprobs_num=request.top_logprobs_num,
                return_text_in_logprobs=True,
            )
        if self._send_priority:
            body["priority"] = self.sglang_priority(request.priority)
        if request.cache_salt is not None and self._salt_field is not None:
            body[self._salt_field] = request.cache_salt
        return body

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        client = self.require_client()
        rid = request.rid
        upstream = self.running[rid] = self.upstream_rid(request)
        body = self.request_json(request, upstream)
        opened = finished = False
        final: Chunk | None = None
        try:
            if not request.stream:
                opened = True  # from here on, leaving early aborts upstream
                status, answer = await client.fetch("POST", "/generate", json=body)
                if status != 200:
                    opened = False
                    raise error_for_status(status, answer, self.upstream, route="/generate")
                final = self._chunk_from_event(rid, self._answer(answer), _Progress())
            else:
                async with client.stream("POST", "/generate", json=body) as resp:
                    if resp.status != 200:
                        raise error_for_status(resp.status, await resp.aread(), self.upstream,
                                               route="/generate")
                    opened = True
                    progress = _Progress()
                    async for event in resp.aiter_sse():
                        chunk = self._chunk_from_event(rid, event, progress)
                        if chunk.finished:
                            final = chunk  # yielded once the body is read to its end
                        elif final is None:
                            yield chunk
            if final is None or not final.finished:
                raise EngineUnavailableError(
                    f"{self.upstream}: stream for {rid} ended without a finish reason")
            finished = True
            yield final
        except EngineUnavailableError as exc:
            if str(exc).startswith(self.upstream):
                raise
            # Name the replica: "connection lost" alone does not say which one died.
            raise EngineUnavailableError(f"{self.upstream}: {exc}") from exc
        finally:
            self.running.pop(rid, None)
            if opened and not finished:
                self._abort_in_background(upstream)

    def _answer(self, body: bytes) -> dict[str, Any]:
        """A non-streamed `/generate` answer (one prompt: one JSON object)."""
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise EngineUnavailableError(f"{self.upstream}: malformed answer: {exc}") from exc
        if not isinstance(answer, dict):
            raise EngineUnavailableError(f"{self.upstream}: unexpected answer {answer!r:.200}")
        return answer

    def _chunk_from_event(self, rid: str, event: dict[str, Any], progress: _Progress) -> Chunk:
        if "error" in event:
            err = event["error"]
            message = err.get("message") if isinstance(err, dict) else str(err)
            raise InvalidRequestError(f"{self.upstream}: {message}")
        meta = event.get("meta_info") or {}
        completion_tokens = int(meta.get("completion_tokens") or 0)
        ids = event.get("output_ids") or []
        chunk = Chunk(
            rid=rid,
            text=progress.delta_text(event.get("text") or ""),
            token_ids=progress.delta_list(ids, "ids_len", completion_tokens),
            finish_reason=finish_reason_from_json(meta.get("finish_reason")),
            prompt_tokens=int(meta.get("prompt_tokens") or 0),
            completion_tokens=completion_tokens,
            cached_tokens=int(meta.get("cached_tokens") or 0),
        )
        if "output_token_logprobs" in meta:
            chunk.output_logprobs = logprobs_from_json(progress.delta_list(
                meta["output_token_logprobs"] or [], "logprobs_len", completion_tokens))
        if meta.get("output_top_logprobs"):
            chunk.output_top_logprobs = top_logprobs_from_json(progress.delta_list(
                meta["output_top_logprobs"], "top_len", completion_tokens))
        if chunk.finished:
            if "input_token_logprobs" in meta:
                chunk.input_logprobs = logprobs_from_json(meta["input_token_logprobs"])
            if meta.get("input_top_logprobs"):
                chunk.input_top_logprobs = top_logprobs_from_json(meta["input_top_logprobs"])
            self.count_prompt(chunk.prompt_tokens, chunk.cached_tokens)
        return chunk

    # ---------------------------------------------------------------- control

    def _abort_in_background(self, rid: str) -> None:
        """The consumer went away mid-stream. Closing the connection already makes SGLang
        abort; the explicit abort makes sure, without delaying the consumer."""
        if self.client is None:
            return
        task = asyncio.get_running_loop().create_task(self._post_abort(rid))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _post_abort(self, rid: str) -> None:
        try:
            await self.call("POST", "/abort_request", {"rid": rid})
        except EngineError as exc:
            log.debug("abort of %s on %s failed: %s", rid, self.base_url, exc)

    async def abort(self, rid: str) -> None:
        upstream = self.running_request(rid)
        status, body = await self.call("POST", "/abort_request", {"rid": upstream})
        if status >= 400:
            raise error_for_status(status, body, self.upstream)

    async def flush_cache(self) -> bool:
        try:
            status, _ = await self.call("POST", "/flush_cache")
        except EngineError:
            return False
        return status == 200

    async def health(self) -> bool:
        if self.client is None:
            return False
        for path in ("/health", "/get_model_info"):
            try:
                status, _ = await self.call("GET", path)
            except EngineError:
                return False
            if status == 200:
                return True
            if status != 404:
                return False
        return False

    def capabilities(self) -> Capabilities:
        return Capabilities(
            priority=self._send_priority,
            logprobs=True,
            constrained_decoding=True,
            token_ids=True,
            retention=self._writer is not None,
            abort=True,
        )

    async def retain(self, program_id: str, keep: bool) -> None:
        if self._writer is not None:
            self._writer.pin(program_id, keep, flush=False)
            self._writer.schedule_flush()

    async def program_ended(self, program_id: str) -> None:
        if self._writer is not None:
            self._writer.end(program_id, flush=False)
            self._writer.schedule_flush()

    def model_info(self) -> ModelInfo:
        return self._model_info
