"""KV retention: keep a program's prefix cached while it waits between its calls.

A program is *idle* when nothing of it is queued or running: it waits on a tool, or on
its client's next turn, and will most likely come back with a longer prompt on the same
prefix. While it is idle the scheduler asks the engines where its recent calls ran to
retain its prefix (`Engine.retain(program_id, True)`, the radix cache's owner pin, which
the priority eviction order evicts last). The pin is released as soon as the program is
active again (its next call queues; a running request locks its own prefix anyway), when
the program ends, or after `retention_timeout_s` of idleness.

Pinning only idle programs keeps the pinned set small and meaningful: under load most
programs have calls queued or running, and pinning them all would protect nothing.
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
        self.pins = 0  # retain(True) hints sent
        self._tasks: set[asyncio.Task[None]] = set()

    def on_call_finished(self, program: Program, replica: Replica, now: float) -> None:
        """Remember where the program's context is cached now."""
        if self.enabled and replica.capabilities.retention:
            program.touched.add(replica.index)

    def on_idle(self, program: Program, now: float) -> None:
        """Nothing of the program is queued or running: pin its prefix where its recent
        calls ran, and release the pins after the timeout if it stays idle."""
        if not self.enabled or program.single_call or program.is_closed or not program.touched:
            return
        for index in program.touched:
            if index not in program.retained_on:
                program.retained_on.add(index)
                self.pins += 1
                self._send(self.replicas[index], program.engine_key, True)
        program.touched.clear()
        self.retained[program.engine_key] = program
        if not program.retention_timer:
            program.retention_timer = True
            asyncio.get_running_loop().call_at(now + self.timeout, self._expire, program)

    def on_active(self, program: Program) -> None:
        """The program queued a call again: its pins are no longer needed."""
        if program.retained_on:
            self.release(program)

    def _expire(self, program: Program) -> None:
        program.retention_timer = False
        if not program.retained_on or program.open_calls:
            return
        due = program.idle_since + self.timeout
        loop = asyncio.get_running_loop()
        if loop.time() >= due:
            self.release(program)
        else:  # it was active, then went idle again: wait for the rest of its timeout
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
