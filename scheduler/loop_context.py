"""The event loop a scheduler runs on: its clock, its timers and the tasks it owns.

A `Scheduler` may be built before any loop runs (`progserve.runtime.Runtime` is built in
plain code, then started by the server's lifespan), so the loop is bound at first use.
Every part of the scheduler reads time through here, which is also how `progserve bench`
drives it in virtual time (`engine_backend/virtual_time.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopContext:
    """`loop` and `time()` are plain attributes once bound (the loop's own `time`): the
    scheduler reads the clock several times per call, and a property per read shows."""

    loop: asyncio.AbstractEventLoop
    time: Callable[[], float]

    def __init__(self, on_bind: Callable[[asyncio.AbstractEventLoop], None]) -> None:
        self._on_bind = on_bind  # tells the parts that keep their own reference
        self._tasks: set[asyncio.Task[Any]] = set()

    def __getattr__(self, name: str) -> Any:
        # Only reached while `loop` and `time` are unset: bind to the running loop.
        if name in ("loop", "time"):
            self.bind(asyncio.get_running_loop())
            return getattr(self, name)
        raise AttributeError(name)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.time = loop.time
        self._on_bind(loop)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A background task the scheduler owns: cancelled by `cancel_tasks`."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def run_now(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends to its end, without a task or a loop turn:
    the bookkeeping of the in-process state store (see `StateStore.in_process`)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError(f"{coro!r} suspended; it must run without waiting")
