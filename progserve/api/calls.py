"""One LLM call through the scheduler, as every entrance makes it, and the calls of one
request together.

`ScheduledCall.start` opens (or creates) the caller's program and asks the scheduler for
the call's stream (`scheduler.scheduler.CallStream`); `first()` waits for the first chunk,
so that a bad request or an overloaded server still answers with a proper HTTP error
before any SSE starts. Closing the stream (`close()`, or the task being cancelled) aborts
the engine request. The scheduler books each call itself once it has answered: the API
only reads chunks and lets go of its streams.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import anyio

from engine_backend.types import Chunk, FinishReason, FinishType, GenerateRequest, LogprobEntry

from ..errors import BadRequestError
from .common import ProgramIdentity, close_quietly, new_id, unless_disconnected

if TYPE_CHECKING:
    from fastapi import Request

    from scheduler.scheduler import CallStream

    from ..runtime import InflightRequest, ServerRuntime

T = TypeVar("T")

log = logging.getLogger(__name__)

ABORTED = FinishReason(FinishType.ABORT, message="aborted by /abort_request")


@dataclass(slots=True)
class CallOutput:
    """A call's chunks folded together (what a non-streamed answer reports)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[LogprobEntry] = field(default_factory=list)
    input_logprobs: list[LogprobEntry] | None = None
    output_top_logprobs: list[list[LogprobEntry]] | None = None
    input_top_logprobs: list[list[LogprobEntry]] | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, chunk: Chunk) -> None:
        if chunk.text:
            self.text += chunk.text
        if chunk.token_ids:
            self.token_ids.extend(chunk.token_ids)
        if chunk.output_logprobs:
            self.output_logprobs.extend(chunk.output_logprobs)
        if chunk.input_logprobs is not None:
            self.input_logprobs = chunk.input_logprobs
        if chunk.output_top_logprobs:
            if self.output_top_logprobs is None:
                self.output_top_logprobs = []
            self.output_top_logprobs.extend(chunk.output_top_logprobs)
        if chunk.input_top_logprobs is not None:
            self.input_top_logprobs = chunk.input_top_logprobs
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if chunk.prompt_tokens:
            self.prompt_tokens = chunk.prompt_tokens
        if chunk.completion_tokens:
            self.completion_tokens = chunk.completion_tokens
        if chunk.cached_tokens:
            self.cached_tokens = chunk.cached_tokens


class ScheduledCall:
    __slots__ = ("runtime", "tenant", "program_id", "call_id", "rid", "identity", "_stream",
                 "_first", "inflight")

    def __init__(self, runtime: ServerRuntime, tenant: str, program_id: str, call_id: str,
                 rid: str, identity: ProgramIdentity, stream: CallStream,
                 inflight: InflightRequest | None) -> None:
        self.runtime = runtime
        self.tenant = tenant
        self.program_id = program_id
        self.call_id = call_id
        self.rid = rid
        self.identity = identity
        self._stream = stream
        self._first: Chunk | None = None
        self.inflight = inflight

    @classmethod
    async def start(cls, runtime: ServerRuntime, tenant: str, identity: ProgramIdentity,
                    request: GenerateRequest, *, abortable: bool = False) -> ScheduledCall:
        """`abortable`: register the rid so `/abort_request` can end this call."""
        inflight = None
        if abortable:
            inflight = runtime.requests.add(request.rid, tenant)
            if inflight is None:
                raise BadRequestError(f"request id {request.rid!r} is already in flight",
                                      param="rid")
        try:
            scheduler = runtime.scheduler
            program_id = await scheduler.open_program(identity.program_id, tenant=tenant)
            call_id = identity.call_id or new_id("call")
            stream = scheduler.llm_call(
                program_id, request, tenant=tenant, thread_id=identity.thread_id,
                parent_ids=identity.parent_ids, call_id=call_id,
            )
        except BaseException:
            if inflight is not None:
                runtime.requests.remove(inflight)
            raise
        return cls(runtime, tenant, program_id, call_id, request.rid, identity, stream,
                   inflight)

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Program-Id": self.program_id, "X-Call-Id": self.call_id}

    def bind_to_current_task(self) -> None:
        """The task that consumes the stream is the one an abort cancels. An abort that
        came before (the rid was registered, nothing consumed it yet) ends it here: call
        this inside the `except asyncio.CancelledError` that handles aborts."""
        if self.inflight is not None:
            self.inflight.task = asyncio.current_task()
            if self.inflight.aborted:
                raise asyncio.CancelledError

    @property
    def aborted(self) -> bool:
        return self.inflight is not None and self.inflight.aborted

    async def first(self) -> Chunk:
        """The first chunk; errors before any output surface here (as HTTP errors)."""
        try:
            self._first = await anext(self._stream)
        except StopAsyncIteration:
            self._first = Chunk(rid=self.rid)
        except BaseException:
            await self.close()
            raise
        return self._first

    async def chunks(self) -> AsyncIterator[Chunk]:
        """Every chunk (the first one included, if `first()` fetched it), up to the one
        that finishes the call; then the stream is let go of (the scheduler books the
        call in the next loop turn, after what the consumer does with that chunk)."""
        if self._first is not None:
            first, self._first = self._first, None
            yield first
            if first.finished:
                await close_quietly(self._stream)
                return
        async for chunk in self._stream:
            yield chunk
            if chunk.finished:
                await close_quietly(self._stream)
                return

    async def collect(self) -> CallOutput:
        """The whole answer."""
        out = CallOutput()
        await self._fold_into(out)
        return out

    async def _fold_into(self, out: CallOutput) -> None:
        """Every chunk into `out`, as `chunks()` gives them, up to the one that finishes
        the call; then the stream is let go of. Reads the stream itself: an async
        generator fewer per non-streamed call than through `chunks()`."""
        first, self._first = self._first, None
        if first is not None:
            out.add(first)
            if first.finished:
                await close_quietly(self._stream)
                return
        async for chunk in self._stream:
            out.add(chunk)
            if chunk.finished:
                break
        await close_quietly(self._stream)

    async def collect_abortable(self) -> CallOutput:
        """`collect()`, except that an `/abort_request` for this call's rid ends it early
        with finish `abort` (the partial output is kept)."""
        out = CallOutput()
        try:
            self.bind_to_current_task()
            await self._fold_into(out)
        except asyncio.CancelledError:
            if not self.aborted:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            out.finish_reason = ABORTED
            await self.close()
        if self.inflight is not None:  # answered: a late abort has nothing left to cut
            self.inflight.answered = True
        return out

    async def close(self) -> None:
        """Abort the call if it still runs, let go of its stream, and release the rid;
        safe to call twice."""
        await close_quietly(self._stream)
        if self.inflight is not None:
            self.runtime.requests.remove(self.inflight)

    async def end_program_if_asked(self) -> None:
        if self.identity.end:
            await self.runtime.scheduler.end_program(self.program_id, tenant=self.tenant)


class CallStreams:
    """The calls of one streamed request as one stream of (index, chunk), chunks as they
    come; (index, None) when a call was aborted through `/abort_request`.

    One call streams inline. A batch runs a pump task per call from `started()` on, so
    every call is read to its end (and frees its replica slot) while its siblings wait for
    theirs: a batch larger than the scheduler's in-flight budget completes, and each call
    can be aborted (its task cancelled) on its own."""

    __slots__ = ("calls", "_queue", "_tasks", "_unstarted", "_all_started")

    def __init__(self, calls: list[ScheduledCall]) -> None:
        self.calls = calls
        self._tasks: list[asyncio.Task[None]] = []  # a batch's pumps; none for one call
        self._queue: asyncio.Queue[tuple[int, object]] | None = None
        self._unstarted: set[int] = set()
        self._all_started: asyncio.Future[None] | None = None

    async def started(self, request: Request) -> None:
        """Every call's first chunk (or the first error, raised), before the response's
        status line; the wait ends early (`ClientGone`) if the client leaves, and then, as
        on any error, every call is closed."""
        try:
            if len(self.calls) == 1:
                await unless_disconnected(request, self.calls[0].first)
                return
            loop = asyncio.get_running_loop()
            self._queue = asyncio.Queue()
            self._unstarted = set(range(len(self.calls)))
            all_started = self._all_started = loop.create_future()
            self._tasks = [loop.create_task(self._pump(i, c)) for i, c in enumerate(self.calls)]
            await unless_disconnected(request, lambda: asyncio.shield(all_started))
        except BaseException:
            await self.aclose()
            raise

    async def _pump(self, index: int, call: ScheduledCall) -> None:
        try:
            call.bind_to_current_task()
            async for chunk in call.chunks():
                self._put(index, chunk)
        except asyncio.CancelledError:
            if not call.aborted:
                raise
            self._put(index, None)
        except Exception as exc:  # noqa: BLE001 - forwarded to the consumer
            self._put(index, exc)
        finally:
            self._put(index, _DONE)

    def _put(self, index: int, item: object) -> None:
        assert self._queue is not None
        self._queue.put_nowait((index, item))
        waiting = self._all_started
        if index in self._unstarted and waiting is not None and not waiting.done():
            self._unstarted.discard(index)
            if isinstance(item, Exception):
                waiting.set_exception(item)
            elif not self._unstarted:
                waiting.set_result(None)

    async def __aiter__(self) -> AsyncIterator[tuple[int, Chunk | None]]:
        if not self._tasks:
            async for item in self._inline():
                yield item
            return
        queue = self._queue
        assert queue is not None
        remaining = len(self._tasks)
        while remaining:
            index, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item  # type: ignore[misc]

    async def _inline(self) -> AsyncIterator[tuple[int, Chunk | None]]:
        call = self.calls[0]
        try:
            call.bind_to_current_task()
            async for chunk in call.chunks():
                yield 0, chunk
        except asyncio.CancelledError:
            if not call.aborted:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            yield 0, None

    async def aclose(self) -> None:
        """Stop the pumps and close every call (aborting those still running), even when
        the client is gone and this task is being cancelled."""
        for task in self._tasks:
            task.cancel()
        if self._all_started is not None and not self._all_started.done():
            self._all_started.cancel()
        with anyio.CancelScope(shield=True):
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await close_all(self.calls)


_DONE = object()


async def gather_each(awaitables: list[Awaitable[T]]) -> list[T]:
    """`asyncio.gather`, minus its task per awaitable when there is only one (a single
    prompt is the common case on the hot path)."""
    if len(awaitables) == 1:
        return [await awaitables[0]]
    return list(await asyncio.gather(*awaitables))


async def close_all(calls: list[ScheduledCall]) -> None:
    await gather_each([c.close() for c in calls])


# A request's calls, from start to answer: the steps every entrance takes. Each one closes
# all the calls (aborting their engine requests) when it fails.


def check_batch(runtime: ServerRuntime, size: int, param: str) -> None:
    """Bound a request's prompts (`limits.max_batch`): each one is a call."""
    limit = runtime.settings.limits.max_batch
    if size > limit:
        raise BadRequestError(f"{size} prompts in one request; the limit is {limit}",
                              param=param)


async def start_all(runtime: ServerRuntime, tenant: str,
                    calls: Iterable[tuple[ProgramIdentity, GenerateRequest]], *,
                    abortable: bool = False) -> list[ScheduledCall]:
    """One scheduled call per (identity, request), in order."""
    started: list[ScheduledCall] = []
    try:
        for identity, request in calls:
            started.append(await ScheduledCall.start(runtime, tenant, identity, request,
                                                     abortable=abortable))
    except BaseException:
        await close_all(started)
        raise
    return started


async def start_streaming(request: Request, calls: list[ScheduledCall]) -> CallStreams:
    """The calls' streams once each has its first chunk: see `CallStreams.started`."""
    streams = CallStreams(calls)
    await streams.started(request)
    return streams


async def answer_all(request: Request, calls: list[ScheduledCall], *,
                     abortable: bool = False) -> list[CallOutput]:
    """Every call's whole output (cancelled if the client leaves), the calls let go, and
    the program ended if the client asked. `abortable`: an `/abort_request` ends a call
    early (`collect_abortable`)."""
    collect: Callable[[ScheduledCall], Awaitable[CallOutput]] = (
        ScheduledCall.collect_abortable if abortable else ScheduledCall.collect)
    try:
        outs = await unless_disconnected(request,
                                         lambda: gather_each([collect(c) for c in calls]))
    except BaseException:
        await close_all(calls)
        raise
    await close_all(calls)
    await _end_program_if_asked(calls)
    return outs


async def _end_program_if_asked(calls: list[ScheduledCall]) -> None:
    """The client's answer is ready: a failure to end its program (ended and forgotten
    meanwhile, say) is logged rather than raised in its place."""
    try:
        await calls[0].end_program_if_asked()
    except Exception:  # noqa: BLE001
        log.warning("ending the program of calls %s failed", [c.call_id for c in calls],
                    exc_info=True)
