"""KV retention: keep a program's prefix cached while it waits between its calls.

A program is *idle* when nothing of it is queued or running: it waits on a tool, or on
its client's next turn, and will most likely come back with a longer prompt on the same
prefix. When it goes idle, the scheduler asks the engines where its recent calls ran to
retain its prefix (`Engine.retain(program_id, True)`, the radix cache's owner pin, which
the priority eviction order evicts last).

Pins are *slots* with a budget. Each replica's pins may cover at most
`retention_budget_fraction` of its KV capacity (counted in the programs' context tokens).
A program that goes idle takes a slot if the budget has room, and keeps it, pinned, until
it ends or stays idle past `retention_timeout_s`; a program that finds no room is not
pinned and competes under plain LRU. The budget matters because tool gaps make the
access pattern cyclic: every waiting program comes back after about one tool latency,
and when their contexts together exceed the cache, LRU evicts exactly the program that
returns next, and almost nothing hits. Unbounded pins fail the same way (the pinned set
itself overflows). A bounded set of slot holders that keep their prefixes turns that
into hits for the holders, and the slots pass on as programs end. Keeping the pin while
the holder's next call waits in the queue matters too: under load that wait can be long.
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
        self.budget_fraction = config.retention_budget_fraction
        self.replicas = replicas
        self.retained: dict[str, Program] = {}  # engine key -> program
        self.pinned_tokens = [0] * len(replicas)  # per replica: tokens its slots cover
        self.pins = 0  # retain(True) hints sent
        self.refused = 0  # idle programs left unpinned: their replica's budget was full
        self._tasks: set[asyncio.Task[None]] = set()

    def on_call_finished(
        self, program: Program, replica: Replica, context_tokens: int, now: float
    ) -> None:
        """Remember where the program's context is cached now, and how long it is."""
        if self.enabled and replica.capabilities.retention:
            touched = program.touched
            touched[replica.index] = max(touched.get(replica.index, 0), context_tokens)

    def on_idle(self, program: Program, now: float) -> None:
        """Nothing of the program is queued or running: pin its prefix where its recent
        calls ran, if it holds a slot there or the budget has room for one."""
        if not self.enabled or program.single_call or program.is_closed or not program.touched:
            return
        for index, tokens in program.touched.items():
            held = program.retained_on.get(index)
            if held is None:
                if not self._has_room(index, tokens):
                    self.refused += 1
                    continue
                self.pins += 1
                self._send(self.replicas[index], program.engine_key, True)
            self.pinned_tokens[index] += tokens - (held or 0)
            program.retained_on[index] = tokens
        program.touched.clear()
        if not program.retained_on:
            return
        self.retained[program.engine_key] = program
        if not program.retention_timer:
            program.retention_timer = True
            asyncio.get_running_loop().call_at(now + self.timeout, self._expire, program)

    def _has_room(self, index: int, tokens: int) -> bool:
        capacity = self.replicas[index].kv_capacity
        if capacity <= 0:  # the engine did not say: no budget
            return True
        return self.pinned_tokens[index] + tokens <= self.budget_fraction * capacity

    def _expire(self, program: Program) -> None:
        program.retention_timer = False
        if not program.retained_on or program.open_calls:
            if program.retained_on:  # active now; look again a timeout after it idles
                program.retention_timer = True
                asyncio.get_running_loop().call_later(self.timeout, self._expire, program)
            return
        due = program.idle_since + self.timeout
        loop = asyncio.get_running_loop()
        if loop.time() >= due:
            self.release(program)
        else:  # it was active, then went idle again: wait for the rest of its timeout
            program.retention_timer = True
            loop.call_at(due, self._expire, program)

    def release(self, program: Program) -> None:
        """Unpin the program everywhere and free its slots (it ended, or idled out)."""
        if not program.retained_on:
            return
        key = program.engine_key
        for index, tokens in sorted(program.retained_on.items()):
            self.pinned_tokens[index] -= tokens
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
