"""`HTTPEngine`: what the engines that drive an upstream server over HTTP share (the
client's lifecycle, control calls, the running requests, cache counters, stats)."""

from __future__ import annotations

import logging
from typing import Any

import orjson

from ..base import Engine
from ..errors import EngineError, EngineUnavailableError, UnknownRequestError
from ..types import EngineStats
from .client import HTTPClient
from .errors import error_for_status
from .transport import Transport

log = logging.getLogger(__name__)


class HTTPEngine(Engine):
    """One replica: an upstream server at `base_url`. `transport` replaces the network
    (tests answer in-process with `MockTransport`)."""

    def __init__(self, base_url: str, *, api_key: str | None = None,
                 connect_timeout: float = 5.0, transport: Transport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.upstream = f"{self.name} {self.base_url}"  # how errors name this replica
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._connect_timeout = connect_timeout
        self._transport = transport
        self.client: HTTPClient | None = None
        self.running: dict[str, Any] = {}  # rid -> what `abort` needs to reach it
        self._kv_capacity = 0
        self._cache_hit_tokens = 0
        self._cache_query_tokens = 0
        self._preemptions = 0  # streams the upstream cut short (engine-side preemptions)
        self._recomputed_tokens = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.client is not None:
            return
        self.client = HTTPClient(self.base_url, headers=self._headers,
                                 transport=self._transport,
                                 connect_timeout=self._connect_timeout)
        await self.on_start()

    async def on_start(self) -> None:
        """Learn about the upstream (model, features); the client is up."""

    async def close(self) -> None:
        await self.on_close()
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def on_close(self) -> None:
        """Finish background work before the client closes."""

    def require_client(self) -> HTTPClient:
        if self.client is None:
            raise EngineUnavailableError(f"{self.upstream} is not started")
        return self.client

    # ------------------------------------------------------------------ control calls

    async def call(self, method: str, path: str, body: Any = None,
                   timeout: float | None = None) -> tuple[int, bytes]:
        """A control call (not a generation), bounded by the connect timeout."""
        return await self.require_client().request(
            method, path, json=body, timeout=timeout or self._connect_timeout)

    async def call_json(self, method: str, path: str, body: Any = None,
                        timeout: float | None = None) -> Any:
        """A control call's JSON answer; a typed error for any other status than 200."""
        status, answer = await self.call(method, path, body, timeout)
        if status != 200:
            raise error_for_status(status, answer, self.upstream)
        return orjson.loads(answer)

    async def answers(self, method: str, path: str) -> bool:
        """The upstream answers `path` with 200 (False when it cannot be reached)."""
        if self.client is None:
            return False
        try:
            status, _ = await self.call(method, path)
        except EngineError:
            return False
        return status == 200

    def running_request(self, rid: str) -> Any:
        """What `abort(rid)` needs; UnknownRequestError when `rid` is not running here."""
        if rid not in self.running:
            raise UnknownRequestError(f"no running request {rid!r} on {self.base_url}")
        return self.running[rid]

    # ------------------------------------------------------------------ counters

    def count_prompt(self, prompt_tokens: int, cached_tokens: int) -> None:
        """An upstream answer's prompt and cached tokens, for the cache hit rate."""
        self._cache_hit_tokens += cached_tokens
        self._cache_query_tokens += prompt_tokens

    def count_preemption(self, recomputed_tokens: int) -> None:
        """The upstream cut a stream short and it was resumed with these prompt tokens."""
        self._preemptions += 1
        self._recomputed_tokens += recomputed_tokens

    async def stats(self) -> EngineStats:
        return EngineStats(
            queue_len=0,
            running=len(self.running),
            kv_used_tokens=0,
            kv_capacity_tokens=self._kv_capacity,
            cache_hit_tokens=self._cache_hit_tokens,
            cache_query_tokens=self._cache_query_tokens,
            preemptions=self._preemptions,
            recomputed_tokens=self._recomputed_tokens,
        )
