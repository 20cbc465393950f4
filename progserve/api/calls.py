"""One LLM call through the scheduler, as every entrance makes it.

`ScheduledCall.start` opens (or creates) the caller's program and asks the scheduler for
the call's stream; `first()` waits for the first chunk, so that a bad request or an
overloaded server still answers with a proper HTTP error before any SSE starts.
Closing the stream (`close()`, or the task being cancelled) aborts the engine request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import anyio
from starlette.background import BackgroundTask

from engine_backend.types import Chunk, FinishReason, FinishType, GenerateRequest, LogprobEntry

from ..errors import BadRequestError
from .common import ProgramIdentity, close_quietly, new_id, unless_disconnected

if TYPE_CHECKING:
    from fastapi import Request

    from ..runtime import InflightRequest, Runtime

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
                 "_first", "inflight", "_answered")

    def __init__(self, runtime: Runtime, tenant: str, program_id: str, call_id: str,
                 rid: str, identity: ProgramIdentity, stream: AsyncIterator[Chunk],
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
        self._answered = False  # the final chunk came; the scheduler's stream still runs

    @classmethod
    async def start(cls, runtime: Runtime, tenant: str, identity: ProgramIdentity,
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
        """The task that consumes the stream is the one an abort cancels."""
        if self.inflight is not None:
            self.inflight.task = asyncio.current_task()

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

    async def chunks(self, *, drain: bool = True) -> AsyncIterator[Chunk]:
        """Every chunk (the first one included, if `first()` fetched it). After the final
        one the scheduler's stream is run to its end, so it finishes on its own (cheaper
        than closing it) and the call's bookkeeping runs. `drain=False` leaves that to
        `close()`: a non-streamed answer can be written first."""
        if self._first is not None:
            first, self._first = self._first, None
            yield first
            if first.finished:
                await self._finish(drain)
                return
        async for chunk in self._stream:
            yield chunk
            if chunk.finished:
                await self._finish(drain)
                return

    async def _finish(self, drain: bool) -> None:
        if drain:
            await self._drain()
        else:
            self._answered = True

    async def _drain(self) -> None:
        async for _ in self._stream:
            pass

    async def collect(self) -> CallOutput:
        """The whole answer; the call's bookkeeping is left to `close()` (see `finish_all`)."""
        out = CallOutput()
        async for chunk in self.chunks(drain=False):
            out.add(chunk)
        return out

    async def collect_abortable(self) -> CallOutput:
        """`collect()`, except that an `/abort_request` for this call's rid ends it early
        with finish `abort` (the partial output is kept)."""
        self.bind_to_current_task()
        out = CallOutput()
        try:
            async for chunk in self.chunks(drain=False):
                out.add(chunk)
        except asyncio.CancelledError:
            if not self.aborted:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            out.finish_reason = ABORTED
            await self.close()
        if self.inflight is not None:  # answered: a late abort has nothing left to cut
            self.inflight.task = None
        return out

    async def close(self) -> None:
        """Finish an answered call, abort one still running, and release the rid; safe to
        call twice."""
        if self._answered:
            self._answered = False
            await self._drain()
        await close_quietly(self._stream)
        if self.inflight is not None:
            self.runtime.requests.remove(self.inflight)

    async def end_program_if_asked(self) -> None:
        if self.identity.end:
            await self.runtime.scheduler.end_program(self.program_id, tenant=self.tenant)


async def merge_streams(calls: list[ScheduledCall]) -> AsyncIterator[tuple[int, Chunk | None]]:
    """(index, chunk) from every call as chunks come; (index, None) when a call was
    aborted through `/abort_request`. One call streams inline; a batch runs a pump task
    per call, so that each can be aborted (its task cancelled) on its own."""
    if len(calls) == 1:
        call = calls[0]
        call.bind_to_current_task()
        try:
            async for chunk in call.chunks():
                yield 0, chunk
        except asyncio.CancelledError:
            if not call.aborted:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            yield 0, None
        return
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
    done = object()

    async def pump(index: int, call: ScheduledCall) -> None:
        call.bind_to_current_task()
        try:
            async for chunk in call.chunks():
                queue.put_nowait((index, chunk))
        except asyncio.CancelledError:
            if not call.aborted:
                raise
            queue.put_nowait((index, None))
        except Exception as exc:  # noqa: BLE001 - forwarded to the consumer
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, done))

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(pump(i, c)) for i, c in enumerate(calls)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):  # the client may be gone: still clean up
            await asyncio.gather(*tasks, return_exceptions=True)


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


async def start_all(runtime: Runtime, tenant: str,
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


async def await_first(calls: list[ScheduledCall]) -> None:
    """Every call's first chunk, before a stream's status line is sent."""
    try:
        await gather_each([c.first() for c in calls])
    except BaseException:
        await close_all(calls)
        raise


async def answer_all(request: Request, runtime: Runtime, calls: list[ScheduledCall], *,
                     abortable: bool = False) -> tuple[list[CallOutput], BackgroundTask | None]:
    """Every call's whole output (cancelled if the client leaves), and the task that
    finishes the calls once the answer is written (`finish_after_answer`).
    `abortable`: an `/abort_request` ends a call early (`collect_abortable`)."""
    collect = ScheduledCall.collect_abortable if abortable else ScheduledCall.collect
    try:
        outs = await unless_disconnected(request,
                                         lambda: gather_each([collect(c) for c in calls]))
    except BaseException:
        await close_all(calls)
        raise
    return outs, await finish_after_answer(runtime, calls)


async def finish_all(calls: list[ScheduledCall]) -> None:
    """Answered calls: their bookkeeping, then the program's end if the client asked."""
    await close_all(calls)
    if calls:
        await calls[0].end_program_if_asked()


async def finish_after_answer(runtime: Runtime, calls: list[ScheduledCall]
                              ) -> BackgroundTask | None:
    """`finish_all` as a task that runs once the answer is written (about a fifth of a
    proxied call's CPU leaves its latency), or at once, returning None.

    Deferring is safe only while the finishing never suspends: it then completes before
    the server reads another request, so no client can see a call answered but not yet
    ended. A remote state store (Redis) makes it suspend, so it runs first there."""
    if runtime.scheduler.store.in_process:
        return BackgroundTask(_finish_answered, calls)
    await finish_all(calls)
    return None


async def _finish_answered(calls: list[ScheduledCall]) -> None:
    """`finish_all` once the answer is out: a failure can no longer reach the client (a
    program ended meanwhile, say), so it is logged rather than raised into the server."""
    try:
        await finish_all(calls)
    except Exception:  # noqa: BLE001
        log.warning("finishing answered calls %s failed", [c.call_id for c in calls],
                    exc_info=True)
