"""`SGLangHTTPEngine`: one SGLang server replica, driven through its native HTTP API.

- `POST /generate` with `stream: true`. SGLang's events carry the *cumulative* text (and,
  by default, cumulative `output_ids`); they are turned into delta `Chunk`s here. A request
  whose caller only needs the whole answer (`GenerateRequest.stream` False) is one
  non-streamed `/generate`, yielded as a single final chunk (no SSE on either side).
- `rid` is passed through, so `abort(rid)` can `POST /abort_request`. Closing the stream
  early (the consumer stopped) also aborts upstream: SGLang aborts on disconnect and an
  explicit abort is sent as well.
- `priority`: the request's engine rank (`engine_rank.py`: an int, lower first) as SGLang's
  int32 `priority` (`sglang_priority`). Under `--enable-priority-scheduling` SGLang serves
  *larger* values first unless the server runs `--schedule-low-priority-values-first`
  (`SchedulePolicy.priority_sign` in `srt/managers/schedule_policy.py`), so the rank is
  sent negated, or as is for low-values-first servers: order-preserving, never clamped.
- `cached_tokens`, `prompt_tokens`, `completion_tokens` and the finish reason come from
  `meta_info`.
- KV retention hints (with a `priority_writer`, `settings.http_engine.sglang_priority_file`):
  `retain` and `program_ended` go into the priority file that progserve's SGLang plugin
  reads (`sglang_plugin/priorities.py`), and the upstream rid names the request's program
  (`<program>/<rid>/p` unless the rid already does), which is how the plugin attributes
  the KV it inserts.

One instance per replica URL. Any server speaking this protocol works, progserve's own
`/generate` included.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson

from .base import Engine
from .engine_rank import clamp_rank
from .errors import (
    EngineError,
    EngineUnavailableError,
    InvalidRequestError,
    UnknownRequestError,
)
from .http_client import HTTPPool, error_for_status
from .sglang_plugin.priorities import ProgramPriorityWriter, program_of_rid
from .types import (
    Capabilities,
    Chunk,
    EngineStats,
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

    __slots__ = ("text_len", "ids_len", "logprobs_len")

    def __init__(self) -> None:
        self.text_len = 0
        self.ids_len = 0
        self.logprobs_len = 0

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


class SGLangHTTPEngine(Engine):
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
    ):
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._send_priority = send_priority
        self._low_first = low_priority_values_first
        self._connect_timeout = connect_timeout
        self._pool: HTTPPool | None = None
        self._model_info = ModelInfo(model_path=model_path or self.base_url)
        self._kv_capacity = 0
        self._writer = priority_writer
        self._active: dict[str, str] = {}  # rid -> the rid SGLang knows it by
        self._background: set[asyncio.Task[None]] = set()
        self._cache_hit_tokens = 0
        self._cache_query_tokens = 0
        self._upstream = f"sglang {self.base_url}"

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._pool is not None:
            return
        self._pool = HTTPPool(self.base_url, headers=self._headers,
                              connect_timeout=self._connect_timeout)
        try:
            await self._load_model_info()
        except (EngineError, ValueError, TypeError, AttributeError) as exc:
            log.warning("sglang replica %s: no model info yet (%s)", self.base_url, exc)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._writer is not None:
            await self._writer.aclose()
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    async def _get_json(self, path: str) -> Any:
        status, body = await self._require_pool().request(
            "GET", path, timeout=self._connect_timeout)
        if status != 200:
            raise error_for_status(status, body, self._upstream)
        return orjson.loads(body)

    async def _load_model_info(self) -> None:
        info = await self._get_json("/get_model_info")
        max_len = self._model_info.max_context_len
        try:
            server = await self._get_json("/get_server_info")
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

    def _require_pool(self) -> HTTPPool:
        if self._pool is None:
            raise EngineUnavailableError(f"sglang replica {self.base_url} is not started")
        return self._pool

    # ---------------------------------------------------------------- generate

    def sglang_priority(self, rank: float) -> int:
        """SGLang's `priority` for an engine rank: `-rank`, or `rank` on a server that runs
        `--schedule-low-priority-values-first`; both within int32."""
        rank = clamp_rank(rank)
        return rank if self._low_first else -rank

    def upstream_rid(self, request: GenerateRequest) -> str:
        """The rid sent to SGLang: with retention hints on, it names the program."""
        rid, program = request.rid, request.program_id
        if self._writer is None or not program or program_of_rid(rid) == program:
            return rid
        return f"{program}/{rid.replace('/', '_')}/p"

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
        return body

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        pool = self._require_pool()
        rid = request.rid
        upstream = self._active[rid] = self.upstream_rid(request)
        body = self.request_json(request, upstream)
        opened = finished = False
        final: Chunk | None = None
        try:
            if not request.stream:
                opened = True  # from here on, leaving early aborts upstream
                status, answer = await pool.fetch("POST", "/generate", json=body)
                if status != 200:
                    opened = False
                    raise error_for_status(status, answer, self._upstream)
                final = self._chunk_from_event(rid, self._answer(answer), _Progress())
            else:
                async with pool.stream("POST", "/generate", json=body) as resp:
                    if resp.status != 200:
                        raise error_for_status(resp.status, await resp.aread(), self._upstream)
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
                    f"{self._upstream}: stream for {rid} ended without a finish reason")
            finished = True
            yield final
        except EngineUnavailableError as exc:
            if str(exc).startswith(self._upstream):
                raise
            # Name the replica: "connection lost" alone does not say which one died.
            raise EngineUnavailableError(f"{self._upstream}: {exc}") from exc
        finally:
            self._active.pop(rid, None)
            if opened and not finished:
                self._abort_in_background(upstream)

    def _answer(self, body: bytes) -> dict[str, Any]:
        """A non-streamed `/generate` answer (one prompt: one JSON object)."""
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise EngineUnavailableError(f"{self._upstream}: malformed answer: {exc}") from exc
        if not isinstance(answer, dict):
            raise EngineUnavailableError(f"{self._upstream}: unexpected answer {answer!r:.200}")
        return answer

    def _chunk_from_event(self, rid: str, event: dict[str, Any], progress: _Progress) -> Chunk:
        if "error" in event:
            err = event["error"]
            message = err.get("message") if isinstance(err, dict) else str(err)
            raise InvalidRequestError(f"{self._upstream}: {message}")
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
        if chunk.finished:
            if "input_token_logprobs" in meta:
                chunk.input_logprobs = logprobs_from_json(meta["input_token_logprobs"])
            self._cache_hit_tokens += chunk.cached_tokens
            self._cache_query_tokens += chunk.prompt_tokens
        return chunk

    # ---------------------------------------------------------------- control

    def _abort_in_background(self, rid: str) -> None:
        """The consumer went away mid-stream. Closing the connection already makes SGLang
        abort; the explicit abort makes sure, without delaying the consumer."""
        if self._pool is None:
            return
        task = asyncio.get_running_loop().create_task(self._post_abort(rid))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _post_abort(self, rid: str) -> None:
        try:
            await self._require_pool().request("POST", "/abort_request", json={"rid": rid},
                                               timeout=self._connect_timeout)
        except EngineError as exc:
            log.debug("abort of %s on %s failed: %s", rid, self.base_url, exc)

    async def abort(self, rid: str) -> None:
        upstream = self._active.get(rid)
        if upstream is None:
            raise UnknownRequestError(f"no running request {rid!r} on {self.base_url}")
        status, body = await self._require_pool().request(
            "POST", "/abort_request", json={"rid": upstream}, timeout=self._connect_timeout)
        if status >= 400:
            raise error_for_status(status, body, self._upstream)

    async def flush_cache(self) -> bool:
        try:
            status, _ = await self._require_pool().request(
                "POST", "/flush_cache", timeout=self._connect_timeout)
        except EngineError:
            return False
        return status == 200

    async def health(self) -> bool:
        if self._pool is None:
            return False
        for path in ("/health", "/get_model_info"):
            try:
                status, _ = await self._pool.request("GET", path, timeout=self._connect_timeout)
            except EngineError:
                return False
            if status == 200:
                return True
            if status != 404:
                return False
        return False

    async def stats(self) -> EngineStats:
        return EngineStats(
            queue_len=0,
            running=len(self._active),
            kv_used_tokens=0,
            kv_capacity_tokens=self._kv_capacity,
            cache_hit_tokens=self._cache_hit_tokens,
            cache_query_tokens=self._cache_query_tokens,
        )

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
