"""Cache hints still queued when the scheduler closes are dropped cleanly."""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace
from typing import Any

from scheduler.config import SchedulerConfig
from scheduler.retention import RetentionManager


async def test_a_hint_whose_task_never_started_is_closed_on_close() -> None:
    sent: list[str] = []

    async def hint() -> None:
        sent.append("program_ended")

    retention = RetentionManager(SchedulerConfig(), [])
    queued = hint()
    replica: Any = SimpleNamespace(index=0)
    retention._spawn(replica, queued)  # its task has not run yet
    await retention.close()
    await asyncio.sleep(0)
    # Closed, not left to be collected unawaited ("coroutine ... was never awaited").
    assert inspect.getcoroutinestate(queued) == inspect.CORO_CLOSED
    assert sent == []
