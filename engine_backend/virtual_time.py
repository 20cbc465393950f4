"""An asyncio event loop whose clock is virtual.

When nothing is ready to run and no I/O or thread result is pending, the loop jumps its
clock straight to the next timer instead of sleeping. Code that uses `loop.time()` and
`asyncio.sleep` (every engine and the whole scheduler) therefore runs unchanged, as fast
as the CPU allows: this is how `progserve bench` simulates hours of serving in seconds
while driving the real scheduler.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


# While the loop has callbacks ready, poll real file descriptors once per this many
# iterations (`_JumpingSelector`).
BUSY_POLL_EVERY = 32


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
    def __init__(self) -> None:
        self._virtual = _VirtualClock()
        super().__init__(selector=_JumpingSelector(self._virtual))
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._virtual.now


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on a fresh virtual-time loop."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)
