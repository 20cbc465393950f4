"""Replica health: a replica that fails a call leaves the rotation; a probe brings it back.

- `mark_down(replica, error)`: the scheduler calls it when a call on the replica fails with
  `EngineUnavailableError` (connection refused, the stream broke mid-generation, a 5xx).
  The replica stops taking new calls (`Replica.has_room` is False while it is down), the
  calls parked for it go back to the queue, and its other in-flight calls fail the same
  way and are resumed elsewhere by the scheduler.
- A background task probes every down replica (`Engine.health()`) each
  `health_probe_interval_s`. When one answers, it rejoins and the dispatcher runs a pass.
- Nothing waits forever: if every replica stays down for `replica_down_grace_s`, the calls
  still queued fail with a clear `EngineUnavailableError`.

Detection is passive (the first call that hits a dead replica finds it); that call is not
lost, it is retried, so probing healthy replicas too would add load and no safety.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine_backend.errors import EngineUnavailableError

from .config import SchedulerConfig
from .replica import Replica

log = logging.getLogger(__name__)


@dataclass(slots=True)
class HealthCounters:
    downs: int = 0  # times a replica left the rotation
    rejoins: int = 0  # times a probe brought one back
    failovers: int = 0  # calls resumed on another replica after a failure
    queued_failed: int = 0  # queued calls failed because every replica stayed down


class ReplicaHealth:
    def __init__(
        self,
        config: SchedulerConfig,
        replicas: Sequence[Replica],
        *,
        on_down: Callable[[Replica], None],
        on_rejoin: Callable[[Replica], None],
        fail_queued: Callable[[BaseException], int],
    ) -> None:
        self.replicas = replicas
        self.interval = config.health_probe_interval_s
        self.grace = config.replica_down_grace_s
        self._on_down = on_down
        self._on_rejoin = on_rejoin
        self._fail_queued = fail_queued
        self._probe: asyncio.Task[None] | None = None
        self._all_down_since: float | None = None
        self.counters = HealthCounters()

    def any_up(self) -> bool:
        return any(r.healthy for r in self.replicas)

    def mark_down(self, replica: Replica, error: BaseException) -> None:
        if not replica.healthy:
            return
        replica.healthy = False
        self.counters.downs += 1
        loop = asyncio.get_running_loop()
        if not self.any_up() and self._all_down_since is None:
            self._all_down_since = loop.time()
        log.warning("engine replica %d is down (%s); probing every %.1f s",
                    replica.index, type(error).__name__, self.interval)
        self._on_down(replica)
        if self._probe is None or self._probe.done():
            self._probe = loop.create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while any(not r.healthy for r in self.replicas):
            await asyncio.sleep(self.interval)
            down = [r for r in self.replicas if not r.healthy]
            results = await asyncio.gather(*(self._healthy(r) for r in down))
            for replica, ok in zip(down, results, strict=True):
                if ok:
                    replica.healthy = True
                    self.counters.rejoins += 1
                    log.warning("engine replica %d is back", replica.index)
                    self._on_rejoin(replica)
            if self.any_up():
                self._all_down_since = None
            elif self._all_down_since is not None and \
                    loop.time() - self._all_down_since >= self.grace:
                failed = self._fail_queued(EngineUnavailableError(
                    f"no engine replica has answered for {self.grace:.0f} s"))
                self.counters.queued_failed += failed

    async def _healthy(self, replica: Replica) -> bool:
        try:
            return bool(await asyncio.wait_for(replica.engine.health(),
                                               timeout=max(self.interval, 0.5)))
        except Exception:  # noqa: BLE001 - any failure means: still down
            return False

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None
