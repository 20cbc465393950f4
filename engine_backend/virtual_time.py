"""An asyncio event loop whose clock is virtual.

When nothing is ready to run and no I/O or thread result is pending, the loop jumps its
clock straight to the next timer instead of sleeping. Code that uses `loop.time()` and
`asyncio.sleep` (every engine and the whole scheduler) therefore runs unchanged, as fast
as the CPU allows: this is how `progserve bench` simulates hours of serving in seconds
while driving the real scheduler.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


# While the loop has callbacks ready, poll real file descriptors once per this many
# iterations (`_JumpingSelector`).
BUSY_POLL_EVERY = 32
# As in asyncio's base loop: purge cancelled timers when more than this many are pending
# and over half of them are cancelled.
MIN_TIMERS_TO_PURGE = 100
MAXIMUM_SELECT_TIMEOUT = 24 * 3600


class _VirtualClock:
    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0


class _JumpingSelector(selectors.DefaultSelector):
    """A real selector that, instead of blocking until a timer is due, advances the
    virtual clock by the timeout. Real readiness (the loop's self-pipe, used by threads
    and signals) is still honoured first, and with no timer at all it blocks for real."""

    def __init__(self, clock: _VirtualClock) -> None:
        super().__init__()
        self._clock = clock
        self._busy_skips = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout == 0:  # callbacks are ready: the loop runs them whatever is polled
            # A poll is a system call per loop iteration; while callbacks keep coming,
            # poll only every few iterations (the clock cannot move meanwhile, so real
            # readiness is merely noticed a few callbacks later).
            self._busy_skips += 1
            if self._busy_skips < BUSY_POLL_EVERY:
                return []
        self._busy_skips = 0
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            return super().select(None)
        self._clock.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """Also keeps its timers as `(when, handle)` pairs (`_timers`, not the base loop's
    `_scheduled`): a simulation has hundreds of pending timers and sets or pops one per
    event, and the heap then compares floats in C instead of calling `TimerHandle.__lt__`.
    The pairs order exactly as the handles do (by `when`), so callbacks run in the same
    order as on the base loop."""

    def __init__(self) -> None:
        self._virtual = _VirtualClock()
        self._timers: list[tuple[float, asyncio.TimerHandle]] = []
        super().__init__(selector=_JumpingSelector(self._virtual))
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._virtual.now

    def call_soon(
        self, callback: Callable[..., object], *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        """`BaseEventLoop.call_soon` in one frame (a simulation schedules a few callbacks
        per LLM call, every future's done-callbacks included); debug mode keeps the base
        loop's checks."""
        if self._debug:  # type: ignore[attr-defined]
            return super().call_soon(callback, *args, context=context)
        if self._closed:  # type: ignore[attr-defined]
            raise RuntimeError("Event loop is closed")
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)  # type: ignore[attr-defined]
        return handle

    def call_at(
        self, when: float, callback: Callable[..., object], *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        if when is None:
            raise TypeError("when cannot be None")
        self._check_closed()  # type: ignore[attr-defined]
        if self._debug:  # type: ignore[attr-defined]
            self._check_thread()  # type: ignore[attr-defined]
            self._check_callback(callback, "call_at")  # type: ignore[attr-defined]
        timer = asyncio.TimerHandle(when, callback, args, self, context)
        if timer._source_traceback:  # type: ignore[attr-defined]
            del timer._source_traceback[-1]  # type: ignore[attr-defined]
        heapq.heappush(self._timers, (when, timer))
        timer._scheduled = True  # type: ignore[attr-defined]
        return timer

    def close(self) -> None:
        super().close()
        self._timers.clear()

    def _run_once(self) -> None:
        """`BaseEventLoop._run_once` (Python 3.11) over `_timers`."""
        timers = self._timers
        count = len(timers)
        if count > MIN_TIMERS_TO_PURGE and self._timer_cancelled_count / count > 0.5:
            live = []
            for entry in timers:
                if entry[1]._cancelled:
                    entry[1]._scheduled = False
                else:
                    live.append(entry)
            heapq.heapify(live)
            self._timers = timers = live
            self._timer_cancelled_count = 0
        else:
            while timers and timers[0][1]._cancelled:
                self._timer_cancelled_count -= 1
                heapq.heappop(timers)[1]._scheduled = False
        ready = self._ready
        timeout = None
        if ready or self._stopping:
            timeout = 0
        elif timers:
            timeout = min(max(0, timers[0][0] - self._virtual.now), MAXIMUM_SELECT_TIMEOUT)
        event_list = self._selector.select(timeout)
        if event_list:
            self._process_events(event_list)
        event_list = None
        end_time = self._virtual.now + self._clock_resolution
        while timers and timers[0][0] < end_time:
            handle = heapq.heappop(timers)[1]
            handle._scheduled = False
            ready.append(handle)
        for _ in range(len(ready)):
            handle = ready.popleft()
            if handle._cancelled:
                continue
            if self._debug:
                try:
                    self._current_handle = handle
                    handle._run()
                finally:
                    self._current_handle = None
            else:
                handle._run()
        handle = None  # breaks cycles when an exception occurs


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on a fresh virtual-time loop."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)
