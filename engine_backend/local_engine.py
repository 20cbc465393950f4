"""What the two in-process engines (sim and torch) share: a batcher over an optional
radix cache, driven by one background task on the event loop.

`LocalEngine` owns that task's lifecycle (start, close, health), the clock the cache reads,
the engine stats and the cache flush. A subclass supplies `_run()` (the batching loop),
`_abort_all(reason)` (end every stream when the engine closes) and the KV figures, and may
hook `_on_start()` / `_on_close()` for what it owns besides (the torch engine's worker
thread).
"""

from __future__ import annotations

import abc
import asyncio
from typing import Any

from .base import Engine
from .errors import EngineUnavailableError
from .radix_cache import RadixCache
from .types import EngineStats


class LocalEngine(Engine):
    cache: RadixCache | None
    batcher: Any  # n_waiting, running(), and the cache and preemption counters

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.busy_s = 0.0  # seconds spent running steps (the loop's clock: virtual in the sim)

    # ------------------------------------------------------------- lifecycle

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    def _check_open(self) -> None:
        if self._closed:
            raise EngineUnavailableError(f"the {self.name} engine is closed")

    async def start(self) -> None:
        if self._task is not None:
            return
        self._check_open()
        self._loop = asyncio.get_running_loop()
        self._on_start()
        self._task = self._loop.create_task(self._run(), name=f"{self.name}-engine")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._abort_all("the engine closed")
        self._on_close()

    async def health(self) -> bool:
        return not self._closed and (self._task is None or not self._task.done())

    def _on_start(self) -> None:  # noqa: B027 - optional hook
        """Runs once on the event loop, before the batching task starts."""

    def _on_close(self) -> None:  # noqa: B027 - optional hook
        """Runs once after the batching task stopped and every stream ended."""

    @abc.abstractmethod
    async def _run(self) -> None: ...

    @abc.abstractmethod
    def _abort_all(self, reason: str) -> None: ...

    # ------------------------------------------------------------- stats and cache

    @abc.abstractmethod
    def _kv_used(self) -> int: ...

    @abc.abstractmethod
    def _kv_capacity(self) -> int: ...

    async def stats(self) -> EngineStats:
        b = self.batcher
        return EngineStats(
            queue_len=b.n_waiting,
            running=b.running(),
            kv_used_tokens=self._kv_used(),
            kv_capacity_tokens=self._kv_capacity(),
            cache_hit_tokens=b.cache_hit_tokens,
            cache_query_tokens=b.cache_query_tokens,
            preemptions=b.preemptions,
            recomputed_tokens=b.recomputed_tokens,
            busy_s=self.busy_seconds(),
        )

    def busy_seconds(self) -> float:
        """Seconds spent running model steps so far."""
        return self.busy_s

    async def flush_cache(self) -> bool:
        if self.cache is None:
            return False
        self.cache.evict(self.cache.evictable_size())
        return True
