"""One request's undelivered chunks: an engine's step loop puts, the request's consumer drains.

A list plus one future per wait (not an asyncio.Queue) because the step loop hands over
many chunks per step and the consumer takes them all at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .errors import EngineUnavailableError
from .types import Chunk


@dataclass(slots=True)
class ChunkOutbox:
    chunks: list[Chunk] = field(default_factory=list)
    waiter: asyncio.Future[None] | None = None
    error: BaseException | None = None

    def put(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        self.wake()

    def fail(self, error: BaseException) -> None:
        """The engine's loop died: the consumer raises EngineUnavailableError."""
        self.error = error
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self, engine_name: str) -> list[Chunk]:
        """The undelivered chunks (at least one), waiting for them if there are none yet.
        A plain coroutine, so an engine's stream can await it with no generator between."""
        while not self.chunks:
            if self.error is not None:
                raise EngineUnavailableError(f"the {engine_name} engine failed: {self.error!r}")
            self.waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self.waiter = None
        chunks, self.chunks = self.chunks, []
        return chunks

    async def drain(self, engine_name: str) -> AsyncIterator[Chunk]:
        """Yield chunks as they come until the one with a finish reason."""
        while True:
            for chunk in await self.take(engine_name):
                yield chunk
                if chunk.finish_reason is not None:
                    return
