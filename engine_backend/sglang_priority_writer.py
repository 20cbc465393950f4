"""`ProgramPriorityWriter`: progserve's side of the priority file (format in
`priority_file.py`) that its SGLang plugin reads: pins of programs waiting on a tool,
program priorities, and the programs that ended. Atomic replaces, so a reader never sees
half a file."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

from .priority_file import ENDED_WINDOW, PriorityFile, process_file

log = logging.getLogger(__name__)


class ProgramPriorityWriter:
    """Changes are written at once (`flush`), or, by an engine on the event loop, at most
    every `interval_s` (`schedule_flush`): a write per program end would be a file write
    per request at high rates. One writer per file: every replica's engine shares it.
    Given a directory, it writes its own file there, so that several progserve processes
    can feed the same servers; it removes that file when it closes (its pins end with it)."""

    def __init__(self, path: Path, *, interval_s: float = 0.1) -> None:
        self.in_directory = path.is_dir()
        if self.in_directory:
            path = process_file(path, socket.gethostname(), os.getpid())
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
        return PriorityFile(set(self.pinned), dict(self.priorities), list(self.ended)).dumps()

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
