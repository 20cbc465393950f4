"""The server's object graph: settings -> engines -> store -> tools -> scheduler.

One `ServerRuntime` per server (no globals). Routes reach it through `request.app.state`; every
LLM call goes through `runtime.scheduler`, so it is scheduled as part of its program.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine_backend.base import Engine
from engine_backend.chat_template import ChatTemplate
from engine_backend.types import Capabilities, ModelInfo
from scheduler.scheduler import Scheduler
from scheduler.store import InMemoryStateStore, StateStore
from scheduler.store_redis import RedisStateStore
from scheduler.store_resilient import ResilientStateStore
from scheduler.tools.builtin import register_builtin_tools
from scheduler.tools.executor import ToolExecutor
from scheduler.tools.registry import ToolRegistry

from .auth import Authenticator
from .config import Settings
from .engines import build_engines

log = logging.getLogger(__name__)


def tenant_rid(tenant: str, rid: str) -> str:
    """The engine rid of a client's request id: rids are per tenant (two tenants may both
    run `job-7`, and one cannot learn or abort the other's). Collision-free, as a tenant
    name has no `/`."""
    return f"{tenant}/{rid}"


@dataclass(slots=True)
class InflightRequest:
    """A `/generate` (or proxied) request that `/abort_request` may end by its rid."""

    rid: str  # the engine rid, `tenant_rid(tenant, the client's rid)`
    tenant: str
    task: asyncio.Task[Any] | None = None  # the consumer, once it starts (`bind`)
    aborted: bool = False
    answered: bool = False  # a late abort has nothing left to cut


@dataclass(slots=True)
class RequestRegistry:
    """Engine rid -> in-flight request, so an abort can reach the task that consumes its
    stream. Cancelling that task closes the scheduler's stream, which aborts the engine
    request. A client names its request by its own rid; `tenant_rid` makes that the key,
    so each tenant has a rid space of its own."""

    by_rid: dict[str, InflightRequest] = field(default_factory=dict)

    def add(self, rid: str, tenant: str) -> InflightRequest | None:
        """Register engine rid `rid`; None when it is already in flight."""
        if rid in self.by_rid:
            return None
        entry = self.by_rid[rid] = InflightRequest(rid, tenant)
        return entry

    def remove(self, entry: InflightRequest) -> None:
        if self.by_rid.get(entry.rid) is entry:
            del self.by_rid[entry.rid]

    def in_flight(self, tenant: str, rid: str) -> bool:
        return tenant_rid(tenant, rid) in self.by_rid

    def abort(self, rid: str, tenant: str) -> bool:
        """Abort the tenant's request `rid` (its own rid, as the client sent it)."""
        entry = self.by_rid.get(tenant_rid(tenant, rid))
        if entry is None or entry.tenant != tenant:
            return False
        return self._cancel(entry)

    def abort_all(self, tenant: str) -> int:
        return sum(self._cancel(e) for e in list(self.by_rid.values()) if e.tenant == tenant)

    @staticmethod
    def _cancel(entry: InflightRequest) -> bool:
        if entry.aborted or entry.answered or (entry.task is not None and entry.task.done()):
            return False
        entry.aborted = True
        # Registered but its consumer not started yet (the program is opening, the first
        # chunk is on its way): the abort waits on the entry and `bind` acts on it, so an
        # abort in that window is never lost.
        if entry.task is not None:
            entry.task.cancel()
        return True


def merged_capabilities(engines: Sequence[Engine]) -> Capabilities:
    """What every replica can do (a call may land on any of them)."""
    caps = [e.capabilities() for e in engines]
    return Capabilities(**{
        name: all(getattr(c, name) for c in caps)
        for name in ("priority", "logprobs", "constrained_decoding", "token_ids", "retention",
                     "abort", "chat")
    })


def build_store(settings: Settings) -> StateStore:
    if settings.redis_url:
        # Redis down: serve on local history, re-sync when it returns (store_resilient.py).
        return ResilientStateStore(RedisStateStore(settings.redis_url))
    return InMemoryStateStore()


def build_tools(settings: Settings) -> ToolExecutor:
    """The server-side tools: the builtin ones (an allowlist; a request never names code)."""
    config = settings.tools
    registry = register_builtin_tools(
        ToolRegistry(config),
        docs_root=config.docs_root,
        code_runner=config.enable_code_runner,
    )
    return ToolExecutor(registry, config)


class ServerRuntime:
    def __init__(
        self,
        settings: Settings,
        *,
        engines: list[Engine] | None = None,
        store: StateStore | None = None,
        tools: Any = None,
    ) -> None:
        self.settings = settings
        self.auth = Authenticator.from_file(settings.api_keys,
                                            settings.observability.admin_tenants)
        self.engines = engines if engines is not None else build_engines(settings)
        if not self.engines:
            raise ValueError("the runtime needs at least one engine replica")
        self.store = store if store is not None else build_store(settings)
        self._owns_tools = tools is None
        self.tools = tools if tools is not None else build_tools(settings)
        self.scheduler = Scheduler(self.engines, settings.scheduler, store=self.store,
                                   tools=self.tools, cache=settings.cache)
        self.requests = RequestRegistry()
        self.chat_template = ChatTemplate(None)
        self.capabilities = merged_capabilities(self.engines)
        self.model_names = self.served_model_names()
        self._started = False

    @property
    def model_info(self) -> ModelInfo:
        return self.engines[0].model_info()

    @property
    def model_name(self) -> str:
        return self.settings.model or self.model_info.model_path

    def served_model_names(self) -> frozenset[str] | None:
        """The `model` names the OpenAI routes accept (None: any): the served model's name
        and path, and `settings.model_aliases` (`*`: any name)."""
        aliases = self.settings.model_aliases
        if "*" in aliases:
            return None
        return frozenset((self.model_name, self.model_info.model_path, *aliases))

    async def start(self) -> None:
        if self._started:
            return
        await asyncio.gather(*(engine.start() for engine in self.engines))
        # HTTP engines learn their model (and its chat template) at start.
        self.capabilities = merged_capabilities(self.engines)
        self.model_names = self.served_model_names()
        self.chat_template = ChatTemplate(self.model_info.chat_template)
        await self.scheduler.start()
        self._started = True
        log.info("progserve runtime up: engine=%s replicas=%d model=%s policy=%s",
                 self.settings.engine, len(self.engines), self.model_name,
                 self.settings.scheduler.policy)

    async def close(self) -> None:
        """Stops the scheduler, which closes the engines and the store."""
        if not self._started:
            return
        self._started = False
        for entry in list(self.requests.by_rid.values()):
            RequestRegistry._cancel(entry)
        try:
            await self.scheduler.close()
        finally:
            if self._owns_tools:
                await self.tools.aclose()

    async def health(self) -> list[bool]:
        return list(await asyncio.gather(*(self._engine_health(e) for e in self.engines)))

    @staticmethod
    async def _engine_health(engine: Engine) -> bool:
        try:
            return bool(await engine.health())
        except Exception:  # noqa: BLE001 - a broken replica is just unhealthy
            return False

    async def flush_cache(self) -> bool:
        results = await asyncio.gather(*(e.flush_cache() for e in self.engines),
                                       return_exceptions=True)
        return all(r is True for r in results)
