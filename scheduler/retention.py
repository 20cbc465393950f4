"""Program-aware KV retention: the engines' caches learn which programs are over, and
(optionally) which idle programs to keep.

Ended programs (on by default with `retain_kv`). When a program ends, every replica
that cached its context gets `Engine.program_ended(program_id)`: the radix cache
retires the program as an owner, and what no live program shares (its private context)
becomes the first thing to evict under the `priority` order. Plain LRU cannot know
this: a finished program's context looks as fresh as a live one's for a whole cache
turnover, and under memory pressure it is the live programs, back from their tools,
that miss. Under memory pressure the hint raises the hit rate over LRU and shortens the
queue wait, because every hit is prefill the engine does not redo (figures and runs:
docs/architecture.md, Scheduler, KV retention). Its
partner under memory pressure is KV admission (`kv_admission.py`, off by default), which
keeps the live programs' contexts within the KV by holding new programs back.

Pins of idle programs (`retention_budget_fraction` > 0; off by default). A program is
*idle* when nothing of it is queued or running: it waits on a tool, or on its client's
next turn. When it goes idle, the engines where its recent calls ran are asked to retain
its prefix (`Engine.retain(program_id, True)`, the radix owner pin, which the priority
order evicts last). Pins are *slots*: each replica's pins may cover at most that share
of its KV capacity; a program takes a slot if there is room and keeps it, pinned, until
it ends or stays idle past `retention_timeout_s`. The idea: tool gaps make accesses
cyclic, and when the contexts exceed the cache LRU evicts exactly the program that
returns next; a bounded set of holders turns that into hits for them. Measured beside
the ended-program hint, pins did not pay: a fraction of a point at moderate load, and a
loss when memory pressure overloads the engines, where a holder's pin outlives its turn
and evicts the contexts of programs about to run (figures: docs/architecture.md, same
section). Hence the default of no pins.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

from .config import SchedulerConfig
from .program import Program
from .replica import Replica

log = logging.getLogger(__name__)


class RetentionManager:
    def __init__(self, config: SchedulerConfig, replicas: Sequence[Replica]) -> None:
        self.enabled = config.retain_kv
        self.timeout = config.retention_timeout_s
        self.budget_fraction = config.retention_budget_fraction
        self.pinning = self.enabled and self.budget_fraction > 0
        self.replicas = replicas
        self.retained: dict[str, Program] = {}  # engine key -> program
        self.pinned_tokens = [0] * len(replicas)  # per replica: tokens its slots cover
        self.pins = 0  # retain(True) hints sent
        self.refused = 0  # idle programs left unpinned: their replica's budget was full
        self._tasks: dict[asyncio.Task[None], Coroutine[Any, Any, None]] = {}  # task -> its hint

    def on_call_finished(
        self, program: Program, replica: Replica, context_tokens: int, now: float
    ) -> None:
        """Remember where the program's context is cached now, and how long it is."""
        if not self.enabled or not replica.capabilities.retention:
            return
        if program.is_closed:  # it outlived its program's end: its KV was cached just now
            if not program.single_call:
                self._send_ended(replica, program.engine_key)
            return
        program.cached_on.add(replica.index)
        if self.pinning:
            touched = program.touched
            touched[replica.index] = max(touched.get(replica.index, 0), context_tokens)

    def on_idle(self, program: Program, now: float) -> None:
        """Nothing of the program is queued or running: pin its prefix where its recent
        calls ran, if it holds a slot there or the budget has room for one."""
        if (not self.pinning or program.single_call or program.is_closed
                or not program.touched):
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
        """Unpin the program everywhere and free its slots (it idled out)."""
        key = program.engine_key
        for index in self._free_slots(program):
            self._send(self.replicas[index], key, False)

    def on_program_end(self, program: Program) -> None:
        """The program ended: free its slots, and tell every replica that cached its
        context that what only it cached may go first (`Engine.program_ended`, which
        also unpins)."""
        self._free_slots(program)
        if not self.enabled or program.single_call:
            return  # an untagged request: its prefix may be the next turn's
        key = program.engine_key
        for index in sorted(program.cached_on):
            self._send_ended(self.replicas[index], key)
        program.cached_on.clear()

    def _free_slots(self, program: Program) -> list[int]:
        """Give back the program's slots; the replicas they were on."""
        held = sorted(program.retained_on.items())
        for index, tokens in held:
            self.pinned_tokens[index] -= tokens
        program.retained_on.clear()
        self.retained.pop(program.engine_key, None)
        return [index for index, _ in held]

    def _send(self, replica: Replica, key: str, keep: bool) -> None:
        self._spawn(replica, replica.engine.retain(key, keep))

    def _send_ended(self, replica: Replica, key: str) -> None:
        self._spawn(replica, replica.engine.program_ended(key))

    def _spawn(self, replica: Replica, hint: Coroutine[Any, Any, None]) -> None:
        """Send a cache hint as a task: it never delays nor fails the program."""
        task = asyncio.get_running_loop().create_task(self._guarded(replica, hint))
        self._tasks[task] = hint
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    @staticmethod
    async def _guarded(replica: Replica, hint: Coroutine[Any, Any, None]) -> None:
        try:
            await hint
        except Exception:  # a hint; never fail a program over it
            log.warning("cache hint %s failed on replica %d", hint.__qualname__,
                        replica.index, exc_info=True)

    async def close(self) -> None:
        for task, hint in list(self._tasks.items()):
            task.cancel()
            if inspect.getcoroutinestate(hint) == inspect.CORO_CREATED:
                hint.close()  # its task never started: it will never be awaited
        self._tasks.clear()
