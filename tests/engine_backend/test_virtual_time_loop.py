"""The virtual-time loop: timers fire in time order and the clock jumps to them."""

from __future__ import annotations

import asyncio
import time

from engine_backend.virtual_time import run_virtual


def test_timers_fire_in_time_order_and_cancelled_ones_never() -> None:
    async def main() -> tuple[list[float], float]:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        handles = [loop.call_at(when, fired.append, when) for when in (5.0, 1.0, 3.0, 1.0, 4.0)]
        cancelled = [loop.call_later(2.0 + i, fired.append, -1.0) for i in range(300)]
        for handle in cancelled:  # enough to trigger the purge of cancelled timers
            handle.cancel()
        handles[4].cancel()
        await asyncio.sleep(10.0)
        return fired, loop.time()

    wall = time.perf_counter()
    fired, now = run_virtual(main())
    assert fired == [1.0, 1.0, 3.0, 5.0]
    assert now == 10.0
    assert time.perf_counter() - wall < 5.0  # virtual: no real sleeping


def test_threads_and_busy_callbacks_still_complete() -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        spins = 0

        def spin() -> None:  # keeps the loop busy (ready callbacks every iteration)
            nonlocal spins
            spins += 1
            if spins < 1000:
                loop.call_soon(spin)

        loop.call_soon(spin)
        result = await loop.run_in_executor(None, lambda: 41 + 1)
        await asyncio.sleep(0.5)
        return result + (spins >= 1000)

    assert run_virtual(main()) == 43
