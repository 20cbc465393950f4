"""KV retention: keep a program's prefix cached while it waits between calls.

When a call of an open program finishes on a replica, the program will most likely come
back with a longer prompt on the same prefix (after a tool runs, or after the client's
next turn). The scheduler then asks that engine to retain the program's prefix
(`Engine.retain(program_id, True)`, the radix cache's owner pin). The pin is released when
the program ends, or when it has been idle (nothing queued or running) for
`retention_timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from .config import SchedulerConfig
from .dispatcher import Replica
from .program import Program

log = logging.getLogger(__name__)


class RetentionManager:
    def __init__(self, config: SchedulerConfig, replicas: Sequence[Replica]) -> None:
        self.enabled = config.retain_kv
        self.timeout = config.retention_timeout_s
        self.replicas = replicas
        self.retained: dict[str, Program] = {}  # engine key -> program
        self._tasks: set[asyncio.Task[None]] = set()

    def on_call_finished(self, program: Program, replica: Replica, now: float) -> None:
        """Pin the program's prefix on `replica` if the program stays open."""
        if not self.enabled or program.single_call or program.is_closed:
            return
        if not replica.capabilities.retention or replica.index in program.retained_on:
            return
        program.retained_on.add(replica.index)
        self.retained[program.engine_key] = program
        self._send(replica, program.engine_key, True)

    def on_idle(self, program: Program, now: float) -> None:
        """The program has nothing in flight: release its pins after the timeout. One
        timer per program at a time; it re-arms itself if the program was busy since."""
        if program.retained_on and not program.retention_timer:
            program.retention_timer = True
            asyncio.get_running_loop().call_at(now + self.timeout, self._expire, program)

    def _expire(self, program: Program) -> None:
        program.retention_timer = False
        if not program.retained_on:
            return
        if program.open_calls:
            return  # busy: its next idle moment arms a new timer
        due = program.idle_since + self.timeout
        loop = asyncio.get_running_loop()
        if loop.time() >= due:
            self.release(program)
        else:  # it was busy, then went idle again: wait for the rest of its timeout
            program.retention_timer = True
            loop.call_at(due, self._expire, program)

    def release(self, program: Program) -> None:
        if not program.retained_on:
            return
        key = program.engine_key
        for index in sorted(program.retained_on):
            self._send(self.replicas[index], key, False)
        program.retained_on.clear()
        self.retained.pop(key, None)

    def _send(self, replica: Replica, key: str, keep: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._retain(replica, key, keep))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _retain(replica: Replica, key: str, keep: bool) -> None:
        try:
            await replica.engine.retain(key, keep)
        except Exception:  # a hint; never fail a program over it
            log.warning("retain(%s, %s) failed on replica %d", key, keep, replica.index,
                        exc_info=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()
