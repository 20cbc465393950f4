"""Per-tool rate limiting with asyncio-throttle, on the event loop's clock.

asyncio-throttle's `Throttler` keeps a sliding window of start times but reads
`time.monotonic()` and polls every 10 ms. progserve reads time only from the running loop
(so that benchmarks run in virtual time), so this subclass keeps the upstream window and
overrides the two methods that touch the clock; it also sleeps exactly until the oldest
start leaves the window instead of polling.
"""

from __future__ import annotations

import asyncio

from asyncio_throttle import Throttler


class LoopThrottler(Throttler):
    """At most `rate_limit` acquisitions in any window of `period` seconds."""

    def flush(self) -> None:
        now = asyncio.get_running_loop().time()
        while self._task_logs and now - self._task_logs[0] >= self.period:
            self._task_logs.popleft()

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.flush()
            if len(self._task_logs) < self.rate_limit:
                break
            await asyncio.sleep(max(0.0, self._task_logs[0] + self.period - loop.time()))
        self._task_logs.append(loop.time())
