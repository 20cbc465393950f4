"""The one async interface every engine implements: sim, torch, sglang (HTTP), openai (HTTP).

Time: engines read time from the running event loop (`loop.time()`) and wait with
`asyncio.sleep`. Under `engine_backend.virtual_time` the loop's clock is virtual, so the
same engine and scheduler code runs as fast as the CPU allows in benchmarks.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from .types import Capabilities, Chunk, EngineStats, GenerateRequest, ModelInfo


class Engine(abc.ABC):
    """An LLM engine replica.

    Contract:
    - `generate` yields `Chunk`s whose `text`/`token_ids` are deltas; the last chunk has
      `finish_reason` and the counters. It raises `InvalidRequestError` (or a subclass)
      for bad input *before* yielding anything, and `EngineUnavailableError` if the
      engine dies mid-stream.
    - If the consumer stops iterating (closes the generator or its task is cancelled),
      the engine must abort the request and free its KV.
    - `abort(rid)` ends a running or queued request: its stream finishes with
      `FinishType.ABORT`. Unknown rids raise `UnknownRequestError`.
    - `retain(program_id, keep)` is a cache-retention hint: while `keep` is true the
      engine should prefer to keep that program's cached prefix (it waits on a tool).
      `program_ended(program_id)` is the opposite hint: the program will send nothing
      more, so what only it cached may go first. Engines without the capability ignore
      both.
    """

    name: str = "engine"

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start background work (batching loop, HTTP client). Idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background work and release resources. Idempotent."""

    @abc.abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]: ...

    @abc.abstractmethod
    async def abort(self, rid: str) -> None: ...

    @abc.abstractmethod
    async def stats(self) -> EngineStats: ...

    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abc.abstractmethod
    def model_info(self) -> ModelInfo: ...

    async def retain(self, program_id: str, keep: bool) -> None:  # noqa: B027
        """Cache-retention hint; default: ignored."""

    async def program_ended(self, program_id: str) -> None:  # noqa: B027
        """Cache hint: the program ended; default: ignored."""

    async def flush_cache(self) -> bool:
        """Drop every unlocked cache entry. Returns True if the engine did it."""
        return False

    async def health(self) -> bool:
        """True when the engine can take requests."""
        return True

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
