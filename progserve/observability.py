"""Wires traces, metrics and the tracing UI into a progserve app.

`install_observability(app, runtime)` is the one hook the app factory calls: it builds the
trace store (shared through Redis when `--redis-url` is set), the OpenTelemetry tracing and
the Prometheus metrics, subscribes both to the scheduler's events (through an
`EventBatch`, which applies them off the request path), adds the `traceparent` middleware, and mounts `/metrics` and `/ui`. `start()`/`close()` run with the app's
lifespan (the trace store also starts itself lazily on first use).

Who sees what: with API keys off, everyone sees everything. With keys on, an admin (a key
with the admin role, or of a tenant in `observability.admin_tenants`) sees every tenant
and the server's load; any other tenant sees only its own programs, traces and
tenant-labelled metric series (no global load figures).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request

from engine_backend.types import EngineStats
from scheduler.policies import policy_levels

from .auth import Authenticator
from .config import ObservabilityConfig
from .event_batch import EventBatch
from .metrics import EngineStatsSource, Metrics, install_metrics
from .trace_store import TraceStore
from .tracing import Tracing, install_tracing
from .ui.routes import install_ui

if TYPE_CHECKING:
    from .runtime import ServerRuntime


@dataclass(slots=True)
class Observability:
    config: ObservabilityConfig
    auth: Authenticator
    store: TraceStore
    tracing: Tracing
    metrics: Metrics
    events: EventBatch

    def visible_tenant(self, headers: Mapping[str, str]) -> str | None:
        """None when the caller may see every tenant; else the one tenant it may see.
        Raises `AuthenticationError` (401) for a missing or unknown key."""
        caller = self.auth.caller_for(headers)
        return None if caller.admin else caller.tenant

    async def start(self) -> None:
        await self.tracing.start()

    async def close(self) -> None:
        self.events.close()
        await self.tracing.shutdown()


def instance_name() -> str:
    """This progserve process, as spans and the UI name it."""
    return f"{socket.gethostname()}-{os.getpid()}"


def build_observability(runtime: ServerRuntime) -> Observability:
    settings = runtime.settings
    config = settings.observability
    redis = None
    if settings.redis_url:
        from redis.asyncio import Redis

        redis = Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    instance = instance_name()
    store = TraceStore(
        instance,
        max_spans=config.trace_max_spans,
        max_programs=config.trace_max_programs,
        redis=redis,
        ttl_s=config.trace_ttl_s,
    )
    tracing = Tracing(
        store,
        instance_id=instance,
        console=config.console_spans,
        otlp_endpoint=settings.otlp_endpoint,
    )
    scheduler = runtime.scheduler
    levels = policy_levels(settings.scheduler)
    metrics = Metrics(
        scheduler_stats=scheduler.stats,
        engine_stats=runtime_engine_stats(runtime),
        queue_levels=levels,
        store_health=lambda: {"history": runtime.store.health(), "traces": store.health()},
    )
    events = EventBatch([tracing.on_event, metrics.on_event])
    store.catch_up = metrics.catch_up = events.flush
    scheduler.add_listener(events.on_event)
    return Observability(config, runtime.auth, store, tracing, metrics, events)


def runtime_engine_stats(runtime: ServerRuntime) -> EngineStatsSource:
    """An async source of every replica's `EngineStats`, by replica index (None for a
    replica that fails to answer this scrape)."""

    async def collect() -> list[EngineStats | None]:
        results = await asyncio.gather(
            *(engine.stats() for engine in runtime.engines), return_exceptions=True
        )
        return [None if isinstance(r, BaseException) else r for r in results]

    return collect


def install_observability(app: FastAPI, runtime: ServerRuntime) -> Observability:
    obs = build_observability(runtime)
    app.state.observability = obs
    install_tracing(app, obs.tracing)
    install_metrics(app)
    install_ui(app)
    return obs


def observability_of(request: Request) -> Observability:
    return request.app.state.observability
