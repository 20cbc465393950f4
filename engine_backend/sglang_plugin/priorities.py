"""Program priorities for SGLang's radix-cache eviction, fed by progserve.

SGLang's `--radix-eviction-policy priority` evicts the nodes with the *lowest* priority
first; a node takes the highest priority of the requests that inserted it, read from
`req.priority` when the request's KV is inserted. progserve knows more than one request:
a program waiting on a tool must keep its prefix, and urgent programs should keep theirs
longer. progserve writes that knowledge to a small JSON file (`ProgramPriorityWriter`);
the plugin, inside SGLang's scheduler process, reads it (`ProgramPriorityFeed`, reloaded
when the file changes) and raises the priority a request's KV is inserted with.

File format: `{"pinned": ["<program id>", ...], "priorities": {"<program id>": int}}`.
Priorities are in SGLang's units (the `priority` progserve's SGLang engine sends: larger
is more urgent). Pinned programs get `PIN_PRIORITY`, above any request priority.

Programs are named by request id: progserve's scheduler sends
`rid = "<program id>/<call id>/<nonce>"` (the program id may itself contain `/`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

PIN_PRIORITY = 1 << 40
ENV_FILE = "PROGSERVE_PRIORITY_FILE"
ENV_REFRESH = "PROGSERVE_PRIORITY_REFRESH_S"


def program_of_rid(rid: str) -> str | None:
    """`"<program>/<call>/<nonce>"` -> `"<program>"`; None for ids of another shape."""
    parts = rid.rsplit("/", 2)
    return parts[0] if len(parts) == 3 and parts[0] else None


class ProgramPriorityFeed:
    """Reads the priority file, at most once per `refresh_s`, and only when it changed."""

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
        self._mtime: float | None = None
        self.pinned: frozenset[str] = frozenset()
        self.priorities: dict[str, int] = {}

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
            mtime = self.path.stat().st_mtime
            if mtime == self._mtime:
                return
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # missing or mid-replace: keep what we had
        self._mtime = mtime
        self.pinned = frozenset(str(p) for p in data.get("pinned", ()))
        self.priorities = {str(k): int(v) for k, v in dict(data.get("priorities", {})).items()}

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


class ProgramPriorityWriter:
    """progserve's side: keeps the file current (atomic replace, so readers never see half)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pinned: set[str] = set()
        self.priorities: dict[str, int] = {}

    def pin(self, program_id: str, keep: bool) -> None:
        (self.pinned.add if keep else self.pinned.discard)(program_id)
        self.flush()

    def set_priority(self, program_id: str, priority: int | None) -> None:
        if priority is None:
            self.priorities.pop(program_id, None)
        else:
            self.priorities[program_id] = int(priority)
        self.flush()

    def forget(self, program_ids: Iterable[str]) -> None:
        for program_id in program_ids:
            self.pinned.discard(program_id)
            self.priorities.pop(program_id, None)
        self.flush()

    def flush(self) -> None:
        data: dict[str, Any] = {"pinned": sorted(self.pinned), "priorities": self.priorities}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)
