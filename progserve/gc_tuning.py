"""The cycle collector of a server process: its pauses timed, and made shorter.

CPython's full collections walk every tracked object, and a progserve server keeps many
alive on purpose (ended programs for state queries, trace summaries, radix nodes): a full
pass over them is a stall of a hundred milliseconds or more for every request in flight,
every couple of seconds under load (figures and the run: docs/architecture.md, Server,
Collector pauses). Objects that survived a full pass are rarely garbage later, and what
they later become is mostly freed by reference counting (the scheduler breaks its own
cycles, `Program.drop_calls`). So after each full pass its survivors are frozen
(`gc.freeze()`): later passes walk only what is newer. Every `full_scan_interval_s` one
pass walks the frozen heap too, so cyclic garbage among old objects still goes, late.
Since every object is walked by one full pass either way, full passes then run after
every collection of the middle generation (`FULL_PASS_THRESHOLD`, CPython's default is
10): the same work in five to six times as many, that much shorter pauses.

Every collection's pause is handed to `on_pause(generation, seconds)` (the
`progserve_gc_pause_seconds` histogram), freezing or not.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

OLDEST = 2  # the generation of CPython's full collections
# Middle-generation collections between full ones while survivors are frozen (CPython: 10).
FULL_PASS_THRESHOLD = 1

PauseSink = Callable[[int, float], None]


class ServerCollector:
    """Installs itself as a `gc` callback; `close()` undoes it (and unfreezes).

    `full_scan_interval_s` 0: time the pauses, change nothing."""

    def __init__(self, full_scan_interval_s: float, on_pause: PauseSink | None = None) -> None:
        self.full_scan_interval_s = full_scan_interval_s
        self.freezes = full_scan_interval_s > 0
        self.on_pause = on_pause
        self.full_scans = 0  # passes that walked the frozen heap too
        self._last_full_scan = time.monotonic()
        self._started = 0.0
        self._installed = False
        self._thresholds = gc.get_threshold()

    def install(self) -> None:
        """Collect and freeze what start-up built (when freezing), then watch every pass."""
        if self._installed:
            return
        if self.freezes:
            gc.collect()
            gc.freeze()
            self._thresholds = gc.get_threshold()
            young, middle, _ = self._thresholds
            gc.set_threshold(young, middle, FULL_PASS_THRESHOLD)
        gc.callbacks.append(self._on_collection)
        self._installed = True

    def close(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._on_collection)
            if self.freezes:
                gc.unfreeze()
                gc.set_threshold(*self._thresholds)
            self._installed = False

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # Runs inside the collector, on whatever thread allocated: it must not take locks
        # (the sink only appends to a list) and must not raise.
        generation = info["generation"]
        if phase == "start":
            if self.freezes and generation == OLDEST:
                self._maybe_thaw()
            self._started = time.perf_counter()
            return
        if self.on_pause is not None:
            self.on_pause(generation, time.perf_counter() - self._started)
        if self.freezes and generation == OLDEST:
            gc.freeze()

    def _maybe_thaw(self) -> None:
        now = time.monotonic()
        if now - self._last_full_scan >= self.full_scan_interval_s:
            self._last_full_scan = now
            self.full_scans += 1
            gc.unfreeze()  # this pass walks everything, old cycles included
