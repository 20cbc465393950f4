"""Program priorities for SGLang's radix-cache eviction, fed by progserve: the reading
side of the priority file (`engine_backend/priority_file.py` has its format; progserve
writes it with `engine_backend/sglang_priority_writer.py`).

SGLang's `--radix-eviction-policy priority` evicts the nodes with the *lowest* priority
first; a node takes the highest priority of the requests that inserted it, read from
`req.priority` when the request's KV is inserted. progserve knows more than one request:
a program waiting on a tool must keep its prefix, and urgent programs should keep theirs
longer. progserve writes that knowledge to a small JSON file;
the plugin, inside SGLang's scheduler process, reads it (`ProgramPriorityFeed`, reloaded
when the file changes) and raises the priority a request's KV is inserted with.

The file's format and the request-id convention: `priority_file.py`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from ..priority_file import ENV_FILE, ENV_REFRESH, PriorityFile, program_of_rid, source_files

__all__ = ["PIN_PRIORITY", "ProgramPriorityFeed", "program_of_rid"]

PIN_PRIORITY = 1 << 40


class ProgramPriorityFeed:
    """Reads the priority file, at most once per `refresh_s`, and only when it changed.

    `path` may be a directory: then every `*.json` in it is a source (one per progserve
    process in front of these servers), merged (`PriorityFile.merge`)."""

    def __init__(
        self,
        path: Path | None,
        *,
        refresh_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.refresh_s = refresh_s
        self._clock = clock
        self._checked = float("-inf")
        self._stamp: tuple[tuple[str, int], ...] | None = None  # sources and their mtimes
        self.pinned: frozenset[str] = frozenset()
        self.priorities: dict[str, int] = {}
        self.ended: tuple[str, ...] = ()
        self._taken: frozenset[str] = frozenset()  # ended programs already handed out
        self._fresh = False  # `ended` was reloaded since `take_ended` last looked

    @classmethod
    def from_env(cls) -> ProgramPriorityFeed:
        path = os.environ.get(ENV_FILE)
        return cls(Path(path) if path else None, refresh_s=float(os.environ.get(ENV_REFRESH, 0.5)))

    def _refresh(self) -> None:
        now = self._clock()
        if self.path is None or now - self._checked < self.refresh_s:
            return
        self._checked = now
        try:
            sources = source_files(self.path)
            stamp = tuple((p.name, p.stat().st_mtime_ns) for p in sources)
            if stamp == self._stamp:
                return
            merged = PriorityFile.merge([PriorityFile.loads(p.read_text()) for p in sources])
        except (OSError, ValueError, TypeError, AttributeError):
            return  # missing, mid-replace or malformed: keep what we had
        self._stamp = stamp
        self.pinned = frozenset(merged.pinned)
        self.priorities = merged.priorities
        self.ended = tuple(merged.ended)
        self._fresh = True

    def take_ended(self) -> list[str]:
        """Programs that ended since the last call (each is handed out once). Cheap when
        the file did not change: it runs on every KV insertion."""
        self._refresh()
        if not self._fresh:
            return []
        self._fresh = False
        taken = self._taken
        self._taken = frozenset(self.ended)  # older ones left the window: forget them
        return [p for p in self.ended if p not in taken]

    def eviction_priority(self, rid: str, request_priority: int | None) -> int:
        """The priority to insert `rid`'s KV with: never below the request's own."""
        base = int(request_priority or 0)
        self._refresh()
        program = program_of_rid(rid)
        if program is None:
            return base
        if program in self.pinned:
            return max(base, PIN_PRIORITY)
        return max(base, self.priorities.get(program, base))
