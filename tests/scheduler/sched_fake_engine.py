"""A minimal engine for scheduler unit tests: deterministic, no cache model.

Each request runs for `prefill_s + max_new_tokens * token_s` of loop time once admitted,
at most `slots` at a time, admitted by priority then arrival (like SGLang with priority
scheduling). It records the order in which requests start.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator

from engine_backend.base import Engine
from engine_backend.errors import UnknownRequestError
from engine_backend.types import (
    Capabilities,
    Chunk,
    EngineStats,
    FinishReason,
    FinishType,
    GenerateRequest,
    ModelInfo,
)


class FakeEngine(Engine):
    name = "fake"

    def __init__(
        self,
        *,
        slots: int = 1,
        token_s: float = 0.01,
        prefill_s: float = 0.0,
        priority: bool = True,
        retention: bool = True,
        fail_rids: set[str] | None = None,
        kv_capacity: int = 0,  # reported by stats(); 0 = unknown (no retention budget)
    ) -> None:
        self.slots = slots
        self.kv_capacity = kv_capacity
        self.token_s = token_s
        self.prefill_s = prefill_s
        self._priority = priority
        self._retention = retention
        self.fail_rids = fail_rids or set()
        self.started: list[str] = []  # rids in start order
        self.requests: list[GenerateRequest] = []
        self.retained: dict[str, bool] = {}
        self.ended: list[str] = []  # program_ended hints
        self.aborted: list[str] = []
        self._free = slots
        self._waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._live: dict[str, asyncio.Event] = {}

    def capabilities(self) -> Capabilities:
        return Capabilities(priority=self._priority, retention=self._retention, token_ids=True)

    def model_info(self) -> ModelInfo:
        return ModelInfo(model_path="fake")

    async def stats(self) -> EngineStats:
        return EngineStats(len(self._waiting), self.slots - self._free, 0, self.kv_capacity,
                           0, 0)

    async def retain(self, program_id: str, keep: bool) -> None:
        self.retained[program_id] = keep

    async def program_ended(self, program_id: str) -> None:
        self.retained.pop(program_id, None)  # the hint unpins too
        self.ended.append(program_id)

    async def abort(self, rid: str) -> None:
        event = self._live.get(rid)
        if event is None:
            raise UnknownRequestError(rid)
        self.aborted.append(rid)
        event.set()

    async def _admit(self, priority: float) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._seq), fut))
        await fut

    def _release(self) -> None:
        while self._waiting:
            _, _, fut = heapq.heappop(self._waiting)
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        rid = request.rid
        aborted = self._live[rid] = asyncio.Event()
        prompt = len(request.input_ids) if request.input_ids is not None else len(request.text or "")
        n = request.sampling.max_new_tokens
        await self._admit(request.priority if self._priority else 0.0)
        self.started.append(rid)
        try:
            if rid in self.fail_rids:
                from engine_backend.errors import EngineUnavailableError

                raise EngineUnavailableError(f"replica died serving {rid}")
            await asyncio.sleep(self.prefill_s)
            for i in range(n):
                try:
                    await asyncio.wait_for(aborted.wait(), self.token_s)
                except TimeoutError:
                    pass
                if aborted.is_set():
                    yield Chunk(rid=rid, finish_reason=FinishReason(FinishType.ABORT, message="aborted"),
                                prompt_tokens=prompt, completion_tokens=i)
                    return
                last = i == n - 1
                yield Chunk(
                    rid=rid,
                    text="x",
                    token_ids=[7],
                    finish_reason=FinishReason(FinishType.LENGTH, length=n) if last else None,
                    prompt_tokens=prompt if last else 0,
                    completion_tokens=n if last else 0,
                )
        finally:
            self._live.pop(rid, None)
            self._release()
