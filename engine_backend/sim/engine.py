"""SimEngine: the embedded default engine. A continuous-batching engine with a radix KV
cache of fixed capacity, priority admission and preemption, chunked prefill and a
calibrated step-cost model; replies come from a pluggable responder.

Time: the engine reads only `loop.time()` and waits on loop timers, so it runs in virtual
time under `engine_backend.virtual_time.run_virtual` (benchmarks: the clock jumps from
event to event) and in real time when serving (`SimConfig.time_scale` compresses it).
One background task advances the batch from event to event (`batch.py`); a new request
or an abort wakes it mid-plan, and it then accounts the whole steps that elapsed.

Streams: a chunk per `stream_interval` tokens, or with `stream_interval=0` one chunk at
the end (what virtual-time benchmarks want: no per-token work at all).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import OrderedDict
from collections.abc import AsyncIterator

from engine_backend.errors import (
    EngineError,
    InvalidRequestError,
    UnknownRequestError,
    UnsupportedError,
)
from engine_backend.local_engine import LocalEngine
from engine_backend.radix_cache import RadixCache, TokenKey
from engine_backend.sim.batch import DONE, ContinuousBatcher, SimRequest, StepPlan
from engine_backend.sim.config import SimConfig
from engine_backend.sim.cost_model import StepCostModel
from engine_backend.sim.logprobs import input_logprobs, output_logprobs
from engine_backend.sim.responders import (
    PromptView,
    ReplyBuilder,
    Responder,
    ScriptedResponder,
    SyntheticResponder,
    parse_choices,
    request_seed,
)
from engine_backend.sim.tokenizer import SimTokenizer
from engine_backend.types import (
    Capabilities,
    Chunk,
    FinishReason,
    FinishType,
    GenerateRequest,
    ModelInfo,
    SamplingParams,
)

# Programs whose cache entries stay tagged with their id (for retention) without a
# retain() call; beyond this many, the least recently seen program's tags are dropped.
MAX_TAGGED_PROGRAMS = 16_384


def _prompt_key(ids: list[int]) -> TokenKey:
    """Encode token ids for the radix cache (a `KeyedTokens` prompt brings its key),
    rejecting negative ids on the way; ids the vocabulary does not know are accepted and
    decode as pseudo-words."""
    try:
        return TokenKey.of_token_ids(ids)
    except ValueError:
        raise InvalidRequestError("input_ids must be non-negative integers") from None


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


def _literal_choices(regex: str | None) -> list[str] | None:
    """The choices of a regex that lists literal alternatives (decoded as a choice)."""
    if not regex:
        return None
    try:
        return parse_choices(regex)
    except UnsupportedError:
        return None  # any other regex: the reply is checked against it (`_check_constraint`)


def _check_constraint(text: str, sampling: SamplingParams) -> None:
    """A simulated model cannot steer free text, but a scripted reply written to fit a
    regex or a JSON schema does: such a reply passes; any other reply fails the request
    (JSON is checked for syntax only, not against the schema)."""
    if sampling.regex is not None:
        try:
            fits = re.fullmatch(sampling.regex, text) is not None
        except re.error as exc:
            raise InvalidRequestError(f"invalid regex: {exc}") from None
        if not fits:
            raise UnsupportedError(f"the sim engine cannot constrain free text to the regex "
                                   f"{sampling.regex!r}, and its reply {text[:60]!r} does "
                                   "not match it")
    if sampling.json_schema is not None:
        try:
            json.loads(text)
        except ValueError:
            raise UnsupportedError(f"the sim engine cannot constrain free text to a JSON "
                                   f"schema, and its reply {text[:60]!r} is not JSON") from None


class SimEngine(LocalEngine):
    name = "sim"

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        responder: Responder | None = None,
        tokenizer: SimTokenizer | None = None,
        cost_model: StepCostModel | None = None,
    ) -> None:
        super().__init__()
        self.config = config = config or SimConfig()
        self.tokenizer = tokenizer or SimTokenizer()
        if responder is None:
            builder = ReplyBuilder(self.tokenizer, config.seed)
            synthetic = SyntheticResponder(builder, config.synthetic_mean_tokens)
            responder = (
                ScriptedResponder.from_file(builder, config.script_file, synthetic)
                if config.script_file
                else synthetic
            )
        self.responder = responder
        self.cost_model = cost_model or StepCostModel.from_hardware(config.hardware)
        self.cache = RadixCache(eviction=config.eviction, clock=self._now)
        self.batcher = ContinuousBatcher(
            config, self.cost_model, self.cache, self._on_finish, self._on_progress
        )
        self._requests: dict[str, SimRequest] = {}
        self._programs: OrderedDict[str, None] = OrderedDict()
        self._pinned: set[str] = set()
        self._wakeup: asyncio.Future[bool] | None = None
        self._t = 0.0  # time of the last step boundary
        self._in_step = False  # a plan is running (from `_t`)

    # ------------------------------------------------------------- lifecycle

    def _on_start(self) -> None:
        self._t = self._now()

    def _abort_all(self, reason: str) -> None:
        for r in list(self._requests.values()):
            self._abort(r, reason)

    # ------------------------------------------------------------ interface

    def capabilities(self) -> Capabilities:
        return Capabilities(
            priority=True,
            logprobs=True,
            constrained_decoding=True,  # regexes that list literal choices
            token_ids=True,
            retention=True,
            abort=True,
        )

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            model_path=self.config.model_path,
            tokenizer_path=self.config.model_path,
            max_context_len=self.config.max_context_len,
        )

    def _kv_used(self) -> int:
        return self.batcher.kv_used()

    def _kv_capacity(self) -> int:
        return self.config.kv_capacity_tokens

    async def retain(self, program_id: str, keep: bool) -> None:
        if keep:
            self._pinned.add(program_id)
            self.cache.pin(program_id)
        else:
            self._pinned.discard(program_id)
            # Its next call re-tags its whole context on insert; forgetting bounds memory.
            self.cache.forget_owner(program_id)
            self._programs.pop(program_id, None)

    async def program_ended(self, program_id: str) -> None:
        self._pinned.discard(program_id)
        self.cache.retire_owner(program_id)
        self._programs.pop(program_id, None)

    async def abort(self, rid: str) -> None:
        r = self._requests.get(rid)
        if r is None:
            raise UnknownRequestError(f"unknown request {rid!r}")
        self._abort(r, "aborted")

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """Validates now (typed errors before anything streams), streams when iterated."""
        return self._stream(self._prepare(request))

    # ------------------------------------------------------------ requests

    def _prepare(self, request: GenerateRequest) -> SimRequest:
        if not isinstance(request, GenerateRequest):
            raise InvalidRequestError(f"expected a GenerateRequest, got {type(request).__name__}")
        self._check_open()
        config = self.config
        sampling = request.sampling
        if sampling.max_new_tokens < 0:
            raise InvalidRequestError(f"max_new_tokens must be >= 0, got {sampling.max_new_tokens}")
        pieces = None
        if request.text:
            ids, pieces = self.tokenizer.encode_pieces(request.text)
            key = TokenKey(ids)
        elif request.input_ids:
            ids = request.input_ids
            key = _prompt_key(ids)
        else:
            raise InvalidRequestError("the prompt is empty")
        n = len(ids)
        if n >= config.max_context_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; the context length is {config.max_context_len}"
            )
        if n >= config.kv_capacity_tokens:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; the KV cache holds {config.kv_capacity_tokens}"
            )
        choices = _literal_choices(sampling.regex)
        if request.rid in self._requests:
            raise InvalidRequestError(f"request {request.rid!r} is already running")
        # Output that cannot fit the context or the KV cache ends with finish "length".
        max_new = min(sampling.max_new_tokens, config.max_context_len - n,
                      config.kv_capacity_tokens - n)
        if max_new < sampling.max_new_tokens:
            sampling = sampling.model_copy(update={"max_new_tokens": max_new})
        seed = request_seed(config.seed, request.rid, key.data, sampling)
        view = PromptView(request.rid, ids, sampling, seed, self.tokenizer, request.text)
        try:
            reply = self.responder.choose(view, choices) if choices else self.responder.reply(view)
        except EngineError:
            raise
        except Exception as exc:  # e.g. a scripted rule's function rejecting this prompt
            raise InvalidRequestError(f"the responder cannot answer this prompt: {exc!r}") from exc
        if choices is None:
            _check_constraint(reply.text, sampling)
        return SimRequest(
            rid=request.rid,
            prompt=ids,
            key=key,
            priority=request.priority,
            program_id=request.program_id,
            max_new=max_new,
            reserve=min(max_new, config.clip_max_new_tokens),
            reply=reply,
            target=len(reply.token_ids),
            seed=seed,
            request=request,
            prompt_pieces=pieces,
        )

    async def _stream(self, r: SimRequest) -> AsyncIterator[Chunk]:
        await self.start()
        if r.rid in self._requests:
            raise InvalidRequestError(f"request {r.rid!r} is already running")
        self._requests[r.rid] = r
        if r.program_id is not None and self.batcher.tag_owners:
            self._tag_program(r.program_id)
        self.batcher.enqueue(r)
        self._wake()
        outbox = r.outbox
        try:
            while True:  # one generator per request: the outbox is awaited, not iterated
                for chunk in await outbox.take("sim"):
                    yield chunk
                    if chunk.finish_reason is not None:
                        return
        finally:
            if r.state != DONE:  # the consumer went away: free its KV
                self._abort(r, None)

    def _tag_program(self, program_id: str) -> None:
        programs = self._programs
        programs[program_id] = None
        programs.move_to_end(program_id)
        if len(programs) > MAX_TAGGED_PROGRAMS:
            oldest, _ = programs.popitem(last=False)
            if oldest not in self._pinned:
                self.cache.forget_owner(oldest)

    def _abort(self, r: SimRequest, message: str | None) -> None:
        """End `r`; `message` None means nobody listens (no final chunk)."""
        if self._requests.get(r.rid) is r:
            del self._requests[r.rid]
        if r.state == DONE:
            return
        generated = self.batcher.abort(r)
        if message is not None:
            finish = FinishReason(FinishType.ABORT, message=message)
            self._push(r, self._chunk(r, r.emitted, generated, finish))
        self._wake()

    # -------------------------------------------------------------- chunks

    def _push(self, r: SimRequest, chunk: Chunk) -> None:
        r.outbox.put(chunk)

    def _chunk(self, r: SimRequest, start: int, end: int, finish: FinishReason | None) -> Chunk:
        reply = r.reply
        # A whole reply in one chunk hands over its list: the engine is done with it.
        tokens = reply.token_ids if start == 0 and end == r.target else reply.token_ids[start:end]
        chunk = Chunk(r.rid, reply.text_between(start, end), tokens)
        request = r.request
        if request.return_logprob:
            chunk.output_logprobs = output_logprobs(reply, r.seed, start, end)
        r.emitted = end
        if finish is not None:
            chunk.finish_reason = finish
            chunk.prompt_tokens = len(r.prompt)
            chunk.completion_tokens = end
            chunk.cached_tokens = r.cached_tokens
            if request.return_logprob and request.logprob_start_len >= 0:
                pieces = r.prompt_pieces or [self.tokenizer.piece(t) for t in r.prompt]
                chunk.input_logprobs = input_logprobs(
                    r.prompt, pieces, request.logprob_start_len, self.responder
                )
        return chunk

    def _on_finish(self, r: SimRequest) -> None:
        if self._requests.get(r.rid) is r:
            del self._requests[r.rid]
        self._push(r, self._chunk(r, r.emitted, r.target, r.reply.finish))

    def _on_progress(self, r: SimRequest, generated: int) -> None:
        if generated > r.emitted:
            self._push(r, self._chunk(r, r.emitted, generated, None))

    # --------------------------------------------------------------- the loop

    def _wake(self) -> None:
        future = self._wakeup
        if future is not None and not future.done():
            future.set_result(True)

    async def _wait(self, deadline: float | None, wakeable: bool) -> bool:
        """Until `deadline` (None: forever); True if woken early by `_wake`."""
        assert self._loop is not None
        future: asyncio.Future[bool] = self._loop.create_future()
        handle = None if deadline is None else self._loop.call_at(deadline, _resolve, future, False)
        if wakeable:
            self._wakeup = future
        try:
            return await future
        finally:
            if handle is not None:
                handle.cancel()
            if self._wakeup is future:
                self._wakeup = None

    async def _run(self) -> None:
        try:
            await self._advance_forever()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug: fail every stream instead of hanging them
            for r in list(self._requests.values()):
                r.outbox.fail(exc)
            raise

    async def _advance_forever(self) -> None:
        loop = self._loop
        assert loop is not None
        batcher, cost, scale = self.batcher, self.cost_model, self.config.time_scale
        while True:
            batcher.boundary()
            plan = batcher.plan()
            if plan is None:  # nothing runs: sleep until a request arrives
                await self._wait(None, wakeable=True)
                self._t = max(self._t, loop.time())
                continue
            end = self._t + plan.seconds * scale
            self._in_step = True
            if plan.steps == 1:  # a step in flight is never cut short
                await self._wait(end, wakeable=False)
            elif await self._wait(end, wakeable=True):  # woken early by a request
                end = self._shorten(plan, loop.time(), cost, scale)
                await self._wait(end, wakeable=False)
            self.busy_s += end - self._t
            self._in_step = False
            self._t = end
            batcher.commit(plan)

    def busy_seconds(self) -> float:
        """`busy_s` plus the part of the steps in flight that has run by now (a plan spans
        many decode steps, up to seconds)."""
        if not self._in_step:
            return self.busy_s
        return self.busy_s + max(0.0, self._now() - self._t)

    def _shorten(self, plan: StepPlan, now: float, cost: StepCostModel, scale: float) -> float:
        """Woken mid-plan: keep the steps done by `now` plus the one in flight."""
        done = cost.decode_steps_within(plan.batch, plan.context, (now - self._t) / scale)
        if done + 1 < plan.steps:
            plan.steps = done + 1
            plan.seconds = cost.decode_span(plan.batch, plan.context, plan.steps)
        return self._t + plan.seconds * scale
