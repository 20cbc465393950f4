"""Program priorities for SGLang's radix-cache eviction, fed by progserve.

SGLang's `--radix-eviction-policy priority` evicts the nodes with the *lowest* priority
first; a node takes the highest priority of the requests that inserted it, read from
`req.priority` when the request's KV is inserted. progserve knows more than one request:
a program waiting on a tool must keep its prefix, and urgent programs should keep theirs
longer. progserve writes that knowledge to a small JSON file (`ProgramPriorityWriter`);
the plugin, inside SGLang's scheduler process, reads it (`ProgramPriorityFeed`, reloaded
when the file changes) and raises the priority a request's KV is inserted with.

File format: `{"pinned": ["<program id>", ...], "priorities": {"<program id>": int},
"ended": ["<program id>", ...]}`. Priorities are in SGLang's units (the `priority`
progserve's SGLang engine sends: larger is more urgent). Pinned programs get
`PIN_PRIORITY`, above any request priority. `ended` lists the most recently ended programs
(a window of `ENDED_WINDOW`, oldest first): what only they cached goes first
(`retirement.py`). `$PROGSERVE_PRIORITY_FILE` may name a directory instead: each progserve
process writes its own file there and the plugin merges them.

Programs are named by request id: progserve's scheduler sends
`rid = "<program id>/<call id>/<nonce>"` (the program id may itself contain `/`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

PIN_PRIORITY = 1 << 40
# Ended programs the file lists (the newest). The plugin reads the file at most every
# `refresh_s`, so this many programs may end between two reads before one is missed.
ENDED_WINDOW = 4096
ENV_FILE = "PROGSERVE_PRIORITY_FILE"
ENV_REFRESH = "PROGSERVE_PRIORITY_REFRESH_S"


def program_of_rid(rid: str) -> str | None:
    """`"<program>/<call>/<nonce>"` -> `"<program>"`; None for ids of another shape."""
    parts = rid.rsplit("/", 2)
    return parts[0] if len(parts) == 3 and parts[0] else None


class ProgramPriorityFeed:
    """Reads the priority file, at most once per `refresh_s`, and only when it changed.

    `path` may be a directory: then every `*.json` in it is a source (one per progserve
    process in front of these servers, see `ProgramPriorityWriter`), merged: pins and
    ended programs are unions, a program's priority the highest any file gives."""

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

    def _sources(self, path: Path) -> list[Path]:
        if path.is_dir():
            return sorted(p for p in path.glob("*.json") if not p.name.startswith("."))
        return [path]

    def _refresh(self) -> None:
        now = self._clock()
        if self.path is None or now - self._checked < self.refresh_s:
            return
        self._checked = now
        try:
            sources = self._sources(self.path)
            stamp = tuple((p.name, p.stat().st_mtime_ns) for p in sources)
            if stamp == self._stamp:
                return
            loaded = [json.loads(p.read_text()) for p in sources]
        except (OSError, ValueError):
            return  # missing or mid-replace: keep what we had
        self._stamp = stamp
        pinned: set[str] = set()
        priorities: dict[str, int] = {}
        ended: dict[str, None] = {}
        for data in loaded:
            pinned.update(str(p) for p in data.get("pinned", ()))
            for program, value in dict(data.get("priorities", {})).items():
                priorities[str(program)] = max(int(value), priorities.get(str(program), int(value)))
            ended.update((str(p), None) for p in data.get("ended", ()))
        self.pinned = frozenset(pinned)
        self.priorities = priorities
        self.ended = tuple(ended)
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


class ProgramPriorityWriter:
    """progserve's side: keeps the file current (atomic replace, so readers never see half).

    Changes are written at once (`flush`), or, by an engine on the event loop, at most
    every `interval_s` (`schedule_flush`): a write per program end would be a file write
    per request at high rates. One writer per file: every replica's engine shares it.
    Given a directory, it writes its own file there (`progserve-<host>-<pid>.json`), so
    that several progserve processes can feed the same servers; it removes that file when
    it closes (its pins end with it)."""

    def __init__(self, path: Path, *, interval_s: float = 0.1) -> None:
        self.in_directory = path.is_dir()
        if self.in_directory:
            path = path / f"progserve-{socket.gethostname()}-{os.getpid()}.json"
        self.path = path
        self.interval_s = interval_s
        self.pinned: set[str] = set()
        self.priorities: dict[str, int] = {}
        self.ended: dict[str, None] = {}  # insertion-ordered, newest last
        self._dirty = False
        self._closed = False
        self._flush_task: asyncio.Task[None] | None = None

    def pin(self, program_id: str, keep: bool, *, flush: bool = True) -> None:
        (self.pinned.add if keep else self.pinned.discard)(program_id)
        if flush:
            self.flush()

    def set_priority(self, program_id: str, priority: int | None, *, flush: bool = True) -> None:
        if priority is None:
            self.priorities.pop(program_id, None)
        else:
            self.priorities[program_id] = int(priority)
        if flush:
            self.flush()

    def end(self, program_id: str, *, flush: bool = True) -> None:
        """The program will send nothing more: drop its pin and priority, list it ended."""
        self.pinned.discard(program_id)
        self.priorities.pop(program_id, None)
        self.ended.pop(program_id, None)
        self.ended[program_id] = None
        while len(self.ended) > ENDED_WINDOW:
            del self.ended[next(iter(self.ended))]
        if flush:
            self.flush()

    def snapshot(self) -> str:
        return json.dumps({"pinned": sorted(self.pinned), "priorities": self.priorities,
                           "ended": list(self.ended)})

    def write(self, text: str) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def flush(self) -> None:
        self.write(self.snapshot())

    def schedule_flush(self) -> None:
        """Write within `interval_s`, off the event loop (call on the loop's thread)."""
        self._dirty = True
        if self._closed:
            return
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_while_dirty())

    async def _flush_while_dirty(self) -> None:
        while self._dirty:  # a change made while the last write ran gets its own
            await asyncio.sleep(self.interval_s)
            self._dirty = False
            text = self.snapshot()  # taken on the loop: the sets change only there
            try:
                await asyncio.to_thread(self.write, text)
            except OSError as exc:  # a full or read-only disk must not break serving
                log.warning("cannot write the priority file %s: %s", self.path, exc)

    async def aclose(self) -> None:
        """Wait for pending changes to be written (the engines are closing); in a shared
        directory, then remove this process's file. Later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if self._flush_task is not None:
            await self._flush_task
        if self.in_directory:
            self.path.unlink(missing_ok=True)
