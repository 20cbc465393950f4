"""Shorter cycle-collector pauses for a server process.

CPython's full collections walk every tracked object, and a progserve server keeps many
alive on purpose (ended programs for state queries, trace summaries, radix nodes): a full
pass over them took 70-100 ms here, a stall for every request in flight, every couple of
seconds under load. Objects that survived a full pass are rarely garbage later, and what
they later become is mostly freed by reference counting (the scheduler breaks its own
cycles, `Program.drop_calls`). So after each full pass its survivors are frozen
(`gc.freeze()`): later passes walk only what is newer. Every `full_scan_interval_s` one
pass walks the frozen heap too, so cyclic garbage among old objects still goes, late.
"""

from __future__ import annotations

import gc
import time
from typing import Any

OLDEST = 2  # the generation of CPython's full collections


class FrozenSurvivors:
    """Installs itself as a `gc` callback; `close()` undoes it (and unfreezes)."""

    def __init__(self, full_scan_interval_s: float) -> None:
        self.full_scan_interval_s = full_scan_interval_s
        self.full_scans = 0  # passes that walked the frozen heap too
        self._last_full_scan = time.monotonic()
        self._installed = False

    def install(self) -> None:
        """Collect and freeze what start-up built, then freeze after every full pass."""
        if self._installed:
            return
        gc.collect()
        gc.freeze()
        gc.callbacks.append(self._on_collection)
        self._installed = True

    def close(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._on_collection)
            gc.unfreeze()
            self._installed = False

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != OLDEST:
            return
        if phase == "start":
            now = time.monotonic()
            if now - self._last_full_scan >= self.full_scan_interval_s:
                self._last_full_scan = now
                self.full_scans += 1
                gc.unfreeze()  # this pass walks everything, old cycles included
        else:
            gc.freeze()
