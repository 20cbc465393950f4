"""The tool executor: runs registered tools for programs, within each tool's limits.

Per call it enforces, in this order: the tool exists and the arguments fit its
signature; the tool's concurrency limit (a semaphore) and rate limit (asyncio-throttle on
the loop clock); the per-attempt timeout; retries with exponential backoff and jitter for
tools registered as idempotent (never for the others: a retried side effect could run
twice). Every call is a child task tracked under its program, so `cancel_program` can cut
all of a program's tools at once.

Synchronous tools run in the executor's own thread pool, so they never block the event
loop. A thread cannot be killed: when such a tool times out or is cancelled, the caller
gets its error at once, but the concurrency slot stays taken until the thread really
returns, so the limit stays true.

Tool time feeds program history: each finished call produces a `ToolCallRecord` (queue
wait, duration, attempts, outcome) passed to the `on_finish` listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from .config import ToolsConfig
from .errors import (
    ToolArgumentError,
    ToolCancelledError,
    ToolError,
    ToolFailedError,
    ToolTimeoutError,
)
from .incremental import IncrementalTool
from .partial import Part, parts_of
from .registry import RegisteredTool, ToolPolicy, ToolRegistry
from .throttle import LoopThrottler

log = logging.getLogger(__name__)

Outcome = Literal["ok", "failed", "timeout", "cancelled", "rejected"]
Listener = Callable[["ToolCallRecord"], None]


class ToolRunner(Protocol):
    """What the scheduler needs from a tool executor."""

    async def run(
        self, name: str, args: dict[str, Any], *, program_id: str, call_id: str
    ) -> Any: ...

    def cancel_program(self, program_id: str) -> int: ...


@dataclass(slots=True)
class ToolCallRecord:
    """One finished tool call, in loop time. `inputs_done_at` is set for incremental
    calls: the moment the last input part arrived (the LLM finished writing)."""

    tool: str
    program_id: str
    call_id: str
    queued_at: float
    finished_at: float = 0.0
    started_at: float | None = None
    inputs_done_at: float | None = None
    attempts: int = 0
    outcome: Outcome = "ok"
    error: str | None = None
    incremental: bool = False

    @property
    def wait_s(self) -> float:
        """Time spent waiting for a concurrency slot or the rate limit."""
        return (
            self.started_at if self.started_at is not None else self.finished_at
        ) - self.queued_at

    @property
    def duration_s(self) -> float:
        """Time from first start to the end (running, retries and backoff)."""
        start = self.started_at if self.started_at is not None else self.finished_at
        return self.finished_at - start

    @property
    def exposed_s(self) -> float:
        """Tool time the program waited on after its input was complete: the part of the
        tool's work that partial execution could not hide behind decoding."""
        start = self.inputs_done_at if self.inputs_done_at is not None else self.queued_at
        return self.finished_at - start


@dataclass(slots=True)
class ToolStats:
    """Counters of one tool, for metrics. Latencies are of calls that ran."""

    queued: int = 0
    running: int = 0
    peak_running: int = 0
    completed: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    retries: int = 0
    latency_sum_s: float = 0.0
    latency_max_s: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=1024))

    def observe(self, latency_s: float) -> None:
        self.latency_sum_s += latency_s
        self.latency_max_s = max(self.latency_max_s, latency_s)
        self.recent.append(latency_s)

    def snapshot(self) -> dict[str, float | int]:
        ordered = sorted(self.recent)
        ended = self.completed + self.failed + self.timed_out + self.cancelled
        return {
            "queued": self.queued,
            "running": self.running,
            "peak_running": self.peak_running,
            "completed": self.completed,
            "failed": self.failed,
            "timed_out": self.timed_out,
            "cancelled": self.cancelled,
            "retries": self.retries,
            "latency_mean_s": self.latency_sum_s / ended if ended else 0.0,
            "latency_max_s": self.latency_max_s,
            "latency_p50_s": _quantile(ordered, 0.50),
            "latency_p95_s": _quantile(ordered, 0.95),
        }


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class _Gate:
    """A tool's concurrency slots plus its rate limiter. A rate slot is taken only once a
    concurrency slot is held, so the rate counts real starts."""

    def __init__(self, policy: ToolPolicy) -> None:
        self._slots = asyncio.Semaphore(policy.max_concurrency)
        self._throttler = (
            LoopThrottler(policy.rate_limit, period=policy.rate_period_s)
            if policy.rate_limit
            else None
        )

    async def acquire(self) -> None:
        await self._slots.acquire()
        if self._throttler is not None:
            try:
                await self._throttler.acquire()
            except BaseException:
                self._slots.release()
                raise

    def release(self) -> None:
        self._slots.release()


@dataclass(slots=True)
class _Call:
    tool: RegisteredTool
    record: ToolCallRecord
    cancelled_by_program: bool = False


class ToolExecutor:
    """Runs registered tools for programs. One per server (or per benchmark run)."""

    def __init__(
        self,
        registry: ToolRegistry,
        config: ToolsConfig | None = None,
        *,
        on_finish: Listener | None = None,
        seed: int | None = None,
    ) -> None:
        self.registry = registry
        self.config = config or registry.config
        self._listeners: list[Listener] = [on_finish] if on_finish else []
        self._gates: dict[str, tuple[ToolPolicy, _Gate]] = {}
        self._stats: dict[str, ToolStats] = {}
        self._inflight: dict[str, dict[asyncio.Task[Any], _Call]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._random = random.Random(seed)

    # -- public API -------------------------------------------------------------------

    async def run(
        self,
        name: str,
        args: dict[str, Any] | None,
        *,
        program_id: str,
        call_id: str,
        on_finish: Listener | None = None,
    ) -> Any:
        """Run tool `name` with `args` for `program_id` and return its result.

        Raises `UnknownToolError`, `ToolArgumentError`, `ToolTimeoutError`,
        `ToolFailedError` or `ToolCancelledError` (all `ToolError`s, naming the tool and
        the call). Cancelling the caller cancels the tool.
        """
        tool = self.registry.get(name, call_id=call_id, program_id=program_id)
        call = self._new_call(tool, program_id, call_id)
        try:
            named = tool.bind(args, call_id=call_id, program_id=program_id)
        except ToolArgumentError as exc:
            self._finalize(call, "rejected", exc, on_finish)
            raise
        return await self._supervise(call, self._with_retries(call, named), on_finish)

    async def run_incremental(
        self,
        name: str,
        parts: AsyncIterator[Part],
        *,
        program_id: str,
        call_id: str,
        on_finish: Listener | None = None,
    ) -> Any:
        """Run tool `name` on input that arrives in parts while the LLM writes it.

        An incremental tool is opened at once (taking its concurrency slot), fed each
        part, and finished when `parts` ends; the timeout applies from then on. A tool
        without an incremental interface gets its whole input once `parts` ends.
        Incremental runs are never retried: their input was streamed once.
        """
        tool = self.registry.get(name, call_id=call_id, program_id=program_id)
        call = self._new_call(tool, program_id, call_id)
        call.record.incremental = tool.incremental is not None
        body = (
            self._run_incremental(call, parts)
            if tool.incremental is not None
            else self._collect_then_run(call, parts)
        )
        return await self._supervise(call, body, on_finish)

    def cancel_program(self, program_id: str) -> int:
        """Cancel every running tool call of `program_id`; returns how many. Their
        callers get `ToolCancelledError`."""
        calls = self._inflight.get(program_id, {})
        for task, call in calls.items():
            call.cancelled_by_program = True
            task.cancel()
        return len(calls)

    def running_calls(self, program_id: str) -> int:
        return len(self._inflight.get(program_id, {}))

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def stats(self) -> dict[str, dict[str, float | int]]:
        """Per-tool counters and latencies (see `ToolStats.snapshot`)."""
        return {name: stats.snapshot() for name, stats in self._stats.items()}

    def tool_stats(self, name: str) -> ToolStats:
        return self._stats.setdefault(name, ToolStats(recent=self._window()))

    async def aclose(self) -> None:
        for program_id in list(self._inflight):
            self.cancel_program(program_id)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def __aenter__(self) -> ToolExecutor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- supervision: tracking, cancellation, records ----------------------------------

    def _new_call(self, tool: RegisteredTool, program_id: str, call_id: str) -> _Call:
        now = asyncio.get_running_loop().time()
        return _Call(tool, ToolCallRecord(tool.name, program_id, call_id, queued_at=now))

    async def _supervise(
        self, call: _Call, body: Coroutine[Any, Any, Any], on_finish: Listener | None
    ) -> Any:
        record = call.record
        task = asyncio.get_running_loop().create_task(
            body, name=f"tool:{record.tool}:{record.program_id}:{record.call_id}"
        )
        calls = self._inflight.setdefault(record.program_id, {})
        calls[task] = call
        try:
            value = await task
        except asyncio.CancelledError:
            self._finalize(call, "cancelled", None, on_finish)
            current = asyncio.current_task()
            if call.cancelled_by_program and not (current and current.cancelling()):
                raise ToolCancelledError(
                    record.tool, call_id=record.call_id, program_id=record.program_id
                ) from None
            raise
        except ToolTimeoutError as exc:
            self._finalize(call, "timeout", exc, on_finish)
            raise
        except ToolArgumentError as exc:
            self._finalize(call, "rejected", exc, on_finish)
            raise
        except BaseException as exc:
            self._finalize(call, "failed", exc, on_finish)
            raise
        finally:
            calls.pop(task, None)
            if not calls:
                self._inflight.pop(record.program_id, None)
        self._finalize(call, "ok", None, on_finish)
        return value

    def _finalize(
        self,
        call: _Call,
        outcome: Outcome,
        error: BaseException | None,
        on_finish: Listener | None,
    ) -> None:
        record = call.record
        record.finished_at = asyncio.get_running_loop().time()
        record.outcome = outcome
        record.error = str(error) if error is not None else None
        stats = self.tool_stats(record.tool)
        match outcome:
            case "ok":
                stats.completed += 1
            case "timeout":
                stats.timed_out += 1
            case "cancelled":
                stats.cancelled += 1
            case _:
                stats.failed += 1
        if record.started_at is not None:
            stats.observe(record.duration_s)
        for listener in [*self._listeners, *([on_finish] if on_finish else [])]:
            try:
                listener(record)
            except Exception:  # a broken listener must not fail the tool call
                log.exception("tool record listener failed")

    # -- one call ------------------------------------------------------------------------

    async def _with_retries(self, call: _Call, args: dict[str, Any]) -> Any:
        policy = call.tool.policy
        for attempt in range(1, policy.attempts + 1):
            call.record.attempts = attempt
            try:
                return await self._attempt(call, args)
            except (ToolTimeoutError, ToolFailedError) as exc:
                if attempt == policy.attempts:
                    if isinstance(exc, ToolFailedError) and attempt > 1:
                        raise self._failed(call, exc.cause, attempt) from exc.cause
                    raise
                self.tool_stats(call.tool.name).retries += 1
                await asyncio.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        cfg = self.config
        delay = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (attempt - 1))
        return max(0.0, delay * (1 + cfg.backoff_jitter * self._random.uniform(-1, 1)))

    async def _attempt(self, call: _Call, args: dict[str, Any]) -> Any:
        tool = call.tool
        async with self._slot(call) as hold_until:
            if tool.fn is None:  # incremental-only tool: feed it the whole input
                coro = self._feed_whole(call, parts_of(tool.input_format, args))
                return await self._timed(call, coro)
            if tool.is_async:
                return await self._timed(call, tool.fn(**args))
            future = asyncio.get_running_loop().run_in_executor(
                self._threads(), functools.partial(tool.fn, **args)
            )
            hold_until.append(future)
            return await self._timed(call, asyncio.shield(future))

    async def _run_incremental(self, call: _Call, parts: AsyncIterator[Part]) -> Any:
        async with self._slot(call):
            call.record.attempts = 1
            return await self._feed_whole(call, parts, timed=True)

    async def _collect_then_run(self, call: _Call, parts: AsyncIterator[Part]) -> Any:
        tool = call.tool
        if tool.input_format == "code":
            args = {"code": "".join([str(value) async for _, value in parts])}
        else:
            args = {key: value async for key, value in parts}
        call.record.inputs_done_at = asyncio.get_running_loop().time()
        named = tool.bind(args, call_id=call.record.call_id, program_id=call.record.program_id)
        return await self._with_retries(call, named)

    async def _feed_whole(
        self, call: _Call, parts: AsyncIterator[Part] | list[Part], *, timed: bool = False
    ) -> Any:
        """Open an instance of the incremental tool, deliver the parts, finish it."""
        assert call.tool.incremental is not None
        instance: IncrementalTool = call.tool.incremental()
        try:
            if isinstance(parts, list):
                for key, value in parts:
                    await self._deliver(call, instance, key, value)
            else:
                async for key, value in parts:  # stream errors propagate unchanged
                    await self._deliver(call, instance, key, value)
            call.record.inputs_done_at = asyncio.get_running_loop().time()
            finish = instance.finish()
            return await (self._timed(call, finish) if timed else self._wrap_errors(call, finish))
        finally:
            try:
                await asyncio.shield(instance.aclose())
            except Exception:
                log.exception("tool %r: aclose failed", call.tool.name)

    async def _deliver(self, call: _Call, instance: IncrementalTool, key: str, value: Any) -> None:
        await self._wrap_errors(call, instance.on_partial(key, value))

    @contextlib.asynccontextmanager
    async def _slot(self, call: _Call) -> AsyncIterator[list[asyncio.Future[Any]]]:
        """Hold one of the tool's slots. Futures appended to the yielded list (threads
        still running after a timeout) keep the slot until they finish."""
        gate = self._gate(call.tool)
        stats = self.tool_stats(call.tool.name)
        stats.queued += 1
        try:
            await gate.acquire()
        finally:
            stats.queued -= 1
        if call.record.started_at is None:
            call.record.started_at = asyncio.get_running_loop().time()
        stats.running += 1
        stats.peak_running = max(stats.peak_running, stats.running)
        hold_until: list[asyncio.Future[Any]] = []

        def release(_: object = None) -> None:
            stats.running -= 1
            gate.release()

        try:
            yield hold_until
        finally:
            pending = [f for f in hold_until if not f.done()]
            if pending:
                pending[0].add_done_callback(_consume_result)
                pending[0].add_done_callback(release)
            else:
                release()

    async def _timed(self, call: _Call, awaitable: Any) -> Any:
        timeout_s = call.tool.policy.timeout_s
        try:
            async with asyncio.timeout(timeout_s) as scope:
                return await self._wrap_errors(call, awaitable)
        except TimeoutError:
            if not scope.expired():
                raise self._failed(call, TimeoutError("the tool raised TimeoutError")) from None
            raise ToolTimeoutError(
                call.tool.name,
                timeout_s,
                call_id=call.record.call_id,
                program_id=call.record.program_id,
            ) from None

    async def _wrap_errors(self, call: _Call, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (ToolError, asyncio.CancelledError):
            raise
        except TimeoutError:
            raise  # `_timed` tells our timeout from the tool's own
        except Exception as exc:
            raise self._failed(call, exc) from exc

    def _failed(
        self, call: _Call, cause: BaseException | str, attempts: int = 1
    ) -> ToolFailedError:
        return ToolFailedError(
            call.tool.name,
            cause,
            attempts=attempts,
            call_id=call.record.call_id,
            program_id=call.record.program_id,
        )

    def _gate(self, tool: RegisteredTool) -> _Gate:
        known = self._gates.get(tool.name)
        if known is None or known[0] is not tool.policy:  # new or re-registered tool
            known = (tool.policy, _Gate(tool.policy))
            self._gates[tool.name] = known
        return known[1]

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.config.max_threads, thread_name_prefix="progserve-tool"
            )
        return self._pool

    def _window(self) -> deque[float]:
        return deque(maxlen=self.config.latency_window)


def _consume_result(future: asyncio.Future[Any]) -> None:
    """Retrieve a late thread result so asyncio does not warn it was never retrieved."""
    if not future.cancelled():
        future.exception()
