"""TorchEngine: real compute behind the engine interface.

A Llama-architecture Hugging Face model (our own forward pass, `model.py`) over a paged KV
pool (`kv_pool.py`) whose prefixes the radix tree shares across requests, with continuous
batching, chunked prefill and priority preemption (`batch.py`).

Threads: the batcher, the radix tree and every stream live on the event loop; each model
step runs in one dedicated worker thread (`runner.py`), so the loop stays free to serve
HTTP while the model computes. The loop only touches request state between steps.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine_backend.errors import (
    InvalidRequestError,
    UnknownRequestError,
    UnsupportedError,
)
from engine_backend.kernels.ops import Backend
from engine_backend.local_engine import LocalEngine
from engine_backend.outbox import ChunkOutbox
from engine_backend.radix_cache import RadixCache, TokenKey
from engine_backend.types import (
    Capabilities,
    Chunk,
    FinishReason,
    FinishType,
    GenerateRequest,
    LogprobEntry,
    ModelInfo,
)

from .batch import DONE, TokenEvent, TorchBatcher, TorchRequest
from .config import TorchConfig
from .constrained import GrammarCompiler, xgrammar_available
from .detokenize import IncrementalDetokenizer, StopStrings
from .kv_pool import KVPool
from .model import LlamaModel
from .runner import ModelRunner
from .sampling import RowSampling

log = logging.getLogger(__name__)

# Text prompts longer than this are tokenized in a thread (about 1 ms per 4k characters).
INLINE_TOKENIZE_CHARS = 16_384


@dataclass(slots=True, eq=False)
class _Stream:
    """The consumer side of a request: text state and undelivered chunks."""

    request: TorchRequest
    spec: GenerateRequest
    detok: IncrementalDetokenizer
    stops: StopStrings
    outbox: ChunkOutbox = field(default_factory=ChunkOutbox)
    pending_text: str = ""
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[LogprobEntry] = field(default_factory=list)
    abort_message: str | None = None
    abort_requested: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def kernel_backend(config: TorchConfig, device: torch.device) -> Backend:
    if config.use_triton == "always" or (config.use_triton == "auto" and device.type == "cuda"):
        return "triton"
    return "torch"


def worker_threads(config: TorchConfig) -> int:
    return config.threads or max(1, (os.cpu_count() or 2) // 2)


class TorchEngine(LocalEngine):
    name = "torch"

    def __init__(
        self, model: LlamaModel, tokenizer: Any, config: TorchConfig, model_path: Path
    ) -> None:
        super().__init__()
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = model_path
        spec = model.spec
        self.max_context_len = min(config.max_context_len or spec.max_positions, spec.max_positions)
        self.pool = KVPool(
            capacity=config.kv_capacity_tokens,
            layers=spec.layers,
            kv_heads=spec.kv_heads,
            head_dim=spec.head_dim,
            dtype=model.dtype,
            device=model.device,
            kernel_backend=model.kernel_backend,
        )
        self.cache = (
            RadixCache(
                eviction=config.eviction,
                on_evict=self.pool.free,
                clock=self._now,
                store_values=True,
            )
            if config.prefix_cache
            else None
        )
        self.batcher = TorchBatcher(config, self.pool, self.cache)
        self.runner = ModelRunner(model, self.pool)
        self._eos_ids = frozenset(spec.eos_token_ids) | (
            {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        )
        self._grammars: GrammarCompiler | None = None
        self._streams: dict[str, _Stream] = {}
        self._aborts: list[_Stream] = []  # applied between steps
        self._executor: ThreadPoolExecutor | None = None
        self._work = asyncio.Event()
        self._request_count = 0

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, config: TorchConfig | None = None
    ) -> TorchEngine:
        """Load a model directory (default: `config.model_path`, else the embedded SmolLM2,
        converted on first use). Blocking: call it before serving, or in a thread."""
        from transformers import AutoTokenizer

        config = config or TorchConfig()
        if path is None and config.model_path is not None:
            path = config.model_path
        if path is None:
            from .smollm2 import ensure_smollm2

            path = ensure_smollm2()
        path = Path(path)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        model = LlamaModel.load(
            path, device=device, dtype=dtype, kernel_backend=kernel_backend(config, device)
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, config, path)

    # ------------------------------------------------------------- lifecycle

    def _on_start(self) -> None:
        threads = worker_threads(self.config)
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="torch-engine", initializer=torch.set_num_threads,
            initargs=(threads,),
        )  # fmt: skip

    def _abort_all(self, reason: str) -> None:
        for stream in list(self._streams.values()):
            self._end(stream, FinishReason(FinishType.ABORT, message=reason))

    def _on_close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ interface

    def capabilities(self) -> Capabilities:
        return Capabilities(
            priority=True,
            logprobs=True,
            constrained_decoding=xgrammar_available(),
            token_ids=True,
            retention=self.cache is not None,
            abort=True,
        )

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            model_path=str(self.model_path),
            tokenizer_path=str(self.model_path),
            max_context_len=self.max_context_len,
            chat_template=getattr(self.tokenizer, "chat_template", None),
        )

    def _kv_used(self) -> int:
        return self.pool.used_slots

    def _kv_capacity(self) -> int:
        return self.pool.capacity

    async def retain(self, program_id: str, keep: bool) -> None:
        if self.cache is None:
            return
        if keep:
            self.cache.pin(program_id)
        else:
            self.cache.forget_owner(program_id)

    async def program_ended(self, program_id: str) -> None:
        if self.cache is not None:
            self.cache.retire_owner(program_id)

    async def abort(self, rid: str) -> None:
        stream = self._streams.get(rid)
        if stream is None:
            raise UnknownRequestError(f"unknown request {rid!r}")
        self._request_abort(stream, "aborted")

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Validates now (typed errors before anything streams), streams when iterated.
        A long text prompt is tokenized in a thread instead (its errors come with the first
        `__anext__`, still before any chunk), so the event loop never stalls on it."""
        self._check(request)
        if request.text is not None and len(request.text) > INLINE_TOKENIZE_CHARS:
            return self._tokenize_then_stream(request)
        return self._stream(self._prepare(request, self._token_ids(request)))

    # ------------------------------------------------------------ requests

    def _check(self, request: GenerateRequest) -> None:
        """Everything that can be checked without tokenizing."""
        if not isinstance(request, GenerateRequest):
            raise InvalidRequestError(f"expected a GenerateRequest, got {type(request).__name__}")
        self._check_open()
        if request.rid in self._streams:
            raise InvalidRequestError(f"request {request.rid!r} is already running")
        sampling = request.sampling
        if (sampling.regex or sampling.json_schema) and not xgrammar_available():
            raise UnsupportedError("constrained decoding needs xgrammar, which is not installed")
        if sampling.regex and sampling.json_schema:
            raise InvalidRequestError("give at most one of `regex` and `json_schema`")
        if request.input_ids is not None:
            vocab = self.model.spec.vocab_size
            if min(request.input_ids) < 0 or max(request.input_ids) >= vocab:
                raise InvalidRequestError(f"input_ids must lie in [0, {vocab})")

    def _token_ids(self, request: GenerateRequest) -> list[int]:
        if request.text is None:
            return list(request.input_ids or [])
        return list(self.tokenizer(request.text).input_ids)

    async def _tokenize_then_stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(None, self._token_ids, request)
        async for chunk in self._stream(self._prepare(request, ids)):
            yield chunk

    def _prepare(self, request: GenerateRequest, ids: list[int]) -> _Stream:
        if not ids:
            raise InvalidRequestError("the prompt has no tokens")
        n = len(ids)
        limit = min(self.max_context_len, self.pool.capacity)
        if n >= limit:
            raise InvalidRequestError(f"the prompt has {n} tokens; the limit is {limit - 1}")
        sampling = request.sampling
        stop_ids = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop_ids |= self._eos_ids
        self._request_count += 1
        seed = (
            sampling.seed if sampling.seed is not None else self.config.seed + self._request_count
        )
        generator = torch.Generator(device=self.model.device)
        generator.manual_seed(seed)
        row = RowSampling(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            generator=generator,
            banned=sorted(stop_ids) if sampling.min_new_tokens > 0 else [],
        )
        start = request.logprob_start_len if request.return_logprob else -1
        # Output that cannot fit the context ends with finish "length".
        max_new = min(sampling.max_new_tokens, limit - n)
        r = TorchRequest(
            rid=request.rid,
            prompt=ids,
            # A KeyedTokens prompt brings its key; ids were checked non-negative above.
            key=TokenKey(ids) if request.text is not None else TokenKey.of_token_ids(request.input_ids),
            priority=request.priority,
            program_id=request.program_id,
            max_new=max_new,
            min_new=min(sampling.min_new_tokens, max_new),  # never past max_new
            stop_ids=frozenset(stop_ids),
            sampling=row,
            input_logprob_start=min(start, n - 1) if start >= 0 else -1,
            cache_salt=request.cache_salt,
        )
        return _Stream(
            r, request, IncrementalDetokenizer(self.tokenizer), StopStrings(sampling.stop)
        )

    async def _attach_grammar(self, stream: _Stream) -> None:
        sampling = stream.spec.sampling
        if not (sampling.regex or sampling.json_schema):
            return
        assert self._loop is not None
        if self._grammars is None:
            self._grammars = await self._loop.run_in_executor(
                self._executor, GrammarCompiler, self.tokenizer, self.model.spec.vocab_size,
                sorted(self._eos_ids),
            )  # fmt: skip
        grammars = self._grammars
        mask = await self._loop.run_in_executor(
            self._executor, lambda: grammars.mask(regex=sampling.regex, json_schema=sampling.json_schema)
        )  # fmt: skip
        stream.request.grammar = mask
        stream.request.sampling.mask = mask

    async def _stream(self, stream: _Stream) -> AsyncIterator[Chunk]:
        await self.start()
        r = stream.request
        if r.rid in self._streams:
            raise InvalidRequestError(f"request {r.rid!r} is already running")
        await self._attach_grammar(stream)
        self._streams[r.rid] = stream
        self.batcher.enqueue(r)
        self._work.set()
        chunks = stream.outbox.drain("torch")
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()
            if r.state != DONE:  # the consumer went away: free its KV
                self._request_abort(stream, None)

    def _request_abort(self, stream: _Stream, message: str | None) -> None:
        """Aborts apply between steps (the worker may be using the request's KV now)."""
        if stream.abort_requested:
            if message is not None:
                stream.abort_message = message
            return
        stream.abort_requested = True
        stream.abort_message = message
        self._aborts.append(stream)
        self._work.set()

    # -------------------------------------------------------------- the loop

    async def _run(self) -> None:
        assert self._loop is not None
        loop, batcher = self._loop, self.batcher
        try:
            while True:
                self._work.clear()
                self._apply_aborts()
                plan = batcher.plan()
                if plan is None:
                    await self._work.wait()
                    continue
                started = loop.time()
                try:
                    out = await loop.run_in_executor(self._executor, self.runner.run, plan)
                except Exception as exc:  # a model failure fails its requests, not the engine
                    log.exception("torch engine step failed")
                    self._fail_plan(plan, exc)
                    continue
                finally:
                    self.busy_s += loop.time() - started
                events, finished = batcher.commit(plan, out)
                self._deliver(events, finished)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug: fail every stream instead of hanging them
            log.exception("torch engine loop died")
            for stream in list(self._streams.values()):
                stream.outbox.fail(exc)
            raise

    def _apply_aborts(self) -> None:
        aborts, self._aborts = self._aborts, []
        for stream in aborts:
            if stream.request.state == DONE:
                continue
            self.batcher.abort(stream.request)
            if stream.abort_message is None:  # nobody listens
                self._streams.pop(stream.request.rid, None)
            else:
                self._end(stream, FinishReason(FinishType.ABORT, message=stream.abort_message))

    def _fail_plan(self, plan: Any, exc: Exception) -> None:
        involved = {id(r): r for r in plan.sample} | {id(r): r for r, _, _ in plan.extends}
        for r in involved.values():
            stream = self._streams.get(r.rid)
            self.batcher.abort(r)
            if stream is not None:
                self._end(stream, FinishReason(FinishType.ABORT, message=f"engine error: {exc}"))

    # ------------------------------------------------------------ delivery

    def _deliver(self, events: list[TokenEvent], finished: list[TorchRequest]) -> None:
        for event in events:
            stream = self._streams.get(event.request.rid)
            if stream is not None:
                self._on_token(stream, event)
        for r in finished:
            stream = self._streams.get(r.rid)
            if stream is not None and r.finish is not None:
                self._end(stream, r.finish)

    def _on_token(self, stream: _Stream, event: TokenEvent) -> None:
        r, token = stream.request, event.token
        spec = stream.spec
        stream.pending_ids.append(token)
        if spec.return_logprob:
            stream.pending_logprobs.append((event.logprob, token, self._piece(token)))
        if r.sampling.banned and len(r.output) >= r.min_new:
            r.sampling.banned = []  # min_new_tokens reached: stop tokens may come now
        finish = self._token_finish(r, token)
        # A stop token's own text is not part of the output (SGLang trims it too).
        text = "" if finish is not None and token in r.stop_ids else stream.detok.push([token])
        visible, matched = stream.stops.push(text)
        stream.pending_text += visible
        if matched is not None:
            finish = FinishReason(FinishType.STOP, matched=matched)
        if finish is not None:
            if matched is None:
                stream.pending_text += stream.stops.flush()
            self.batcher.finish(r, finish)
            self._end(stream, finish)
        elif len(stream.pending_ids) >= self.config.stream_interval:
            self._push(stream, self._take_chunk(stream))

    def _token_finish(self, r: TorchRequest, token: int) -> FinishReason | None:
        if token in r.stop_ids:
            return FinishReason(FinishType.STOP, matched=token)
        if r.grammar is not None and r.grammar.terminated:
            return FinishReason(FinishType.STOP, matched=None)
        if len(r.output) >= r.max_new:
            return FinishReason(FinishType.LENGTH, length=len(r.output))
        return None

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _take_chunk(self, stream: _Stream) -> Chunk:
        chunk = Chunk(stream.request.rid, stream.pending_text, stream.pending_ids)
        if stream.spec.return_logprob:
            chunk.output_logprobs = stream.pending_logprobs
        stream.pending_text, stream.pending_ids, stream.pending_logprobs = "", [], []
        return chunk

    def _end(self, stream: _Stream, finish: FinishReason) -> None:
        r = stream.request
        if r.state != DONE:
            self.batcher.abort(r)
        self._streams.pop(r.rid, None)
        chunk = self._take_chunk(stream)
        chunk.finish_reason = finish
        chunk.prompt_tokens = len(r.prompt)
        chunk.completion_tokens = len(r.output)
        chunk.cached_tokens = r.cached_tokens
        if stream.spec.return_logprob and r.input_logprob_start >= 0:
            chunk.input_logprobs = self._prompt_logprobs(r)
        self._push(stream, chunk)

    def _prompt_logprobs(self, r: TorchRequest) -> list[LogprobEntry]:
        """SGLang's `input_token_logprobs` from `logprob_start_len`: the first prompt token
        has no context and gets None."""
        out: list[LogprobEntry] = []
        for position in range(r.input_logprob_start, len(r.prompt)):
            token = r.prompt[position]
            value = r.input_logprobs.get(position) if position > 0 else None
            out.append((value, token, self._piece(token)))  # type: ignore[arg-type]
        return out

    def _push(self, stream: _Stream, chunk: Chunk) -> None:
        stream.outbox.put(chunk)
