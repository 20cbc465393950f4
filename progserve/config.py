"""progserve's one settings model: defaults < config file < environment < command-line flags.

Environment variables are prefixed `PROGSERVE_`; nested sections use `__`
(`PROGSERVE_SCHEDULER__POLICY=plas`). The file is TOML or JSON (`--config FILE`).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from engine_backend.http.config import HTTPEngineConfig
from engine_backend.sim.config import SimConfig
from engine_backend.torch.config import TorchConfig
from scheduler.config import CacheConfig, SchedulerConfig
from scheduler.tools.config import ToolsConfig

EngineKind = Literal["sim", "torch", "sglang", "openai"]


class LimitsConfig(BaseModel):
    max_request_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="larger request bodies get 413"
    )
    max_tokens: int = Field(16384, ge=1, description="cap on max_tokens / max_new_tokens")
    max_prompt_chars: int = Field(1_000_000, ge=1, description="longer prompts get 400")
    max_batch: int = Field(
        256, ge=1, le=4096, description="prompts in one /generate or /v1/completions request; more get "
        "400 (any batch up to it completes, whatever the scheduler's in-flight budget)"
    )
    default_max_tokens: int = Field(
        1024, ge=1, description="chat completions without max_tokens generate at most this"
    )
    # Overload control (progserve/overload.py: HTTP 429): each limit is shared fairly between the
    # tenants using it; past its share a tenant's new work gets 429 + Retry-After.
    max_inflight_requests: int = Field(
        8192, ge=1, description="requests doing new work at once (streams included), shared "
        "between tenants"
    )
    max_queued_calls: int = Field(
        50_000, ge=1, description="open LLM calls (queued, running, or pending in a submitted "
        "graph, counted when a request's calls are created), shared between tenants; a "
        "request bringing more is a 400"
    )
    retry_after_min_s: float = Field(1.0, gt=0, description="smallest Retry-After sent")
    retry_after_max_s: float = Field(30.0, gt=0, description="largest Retry-After sent")


class ObservabilityConfig(BaseModel):
    """Traces, metrics and the /ui tracing page (progserve/tracing.py, metrics.py, ui/)."""

    console_spans: bool = Field(False, description="also print every finished span to stdout")
    trace_max_spans: int = Field(
        10_000, ge=100, description="spans kept in memory for /ui (about 1.2 KB each)")
    trace_max_programs: int = Field(5_000, ge=10, description="program summaries kept for /ui")
    trace_ttl_s: int = Field(86_400, ge=60, description="lifetime of spans shared in Redis")
    admin_tenants: list[str] = Field(
        default_factory=lambda: ["admin"],
        description="with API keys on, every key of these tenants is an admin (as a key with "
        "the admin role in the keys file): every tenant in /metrics and /ui, the server's "
        "load, the operator routes",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PROGSERVE_", env_nested_delimiter="__", extra="forbid"
    )

    host: str = Field("127.0.0.1", description="bind address of `serve`")
    port: int = Field(30080, ge=0, le=65535, description="port of `serve` (0: a free one)")
    engine: EngineKind = Field("sim", description="sim, torch, sglang or openai")
    engine_url: list[str] = Field(default_factory=list, description="one per replica")
    replicas: int = Field(1, ge=1, description="embedded engine replicas (sim/torch)")
    model: str | None = Field(None, description="model path or name served")
    model_aliases: list[str] = Field(
        default_factory=list,
        description="other model names the OpenAI routes accept for the served model (an "
                    "unknown name gets 404 model_not_found, as OpenAI answers); \"*\" accepts "
                    "any name",
    )
    redis_url: str | None = Field(None, description="share program history and traces")
    api_keys: Path | None = Field(None, description="JSON file: sha256(key) -> tenant")
    log_level: str = Field("info", description="debug, info, warning or error")
    otlp_endpoint: str | None = Field(None, description="OTLP/HTTP trace exporter URL")
    startup_probe: bool = Field(
        True, description="sglang/openai: `serve` probes each engine server at start-up (in "
        "the background) and logs what is missing and what it changes",
    )
    gc_full_scan_interval_s: float = Field(
        300.0, ge=0,
        description="`serve` freezes what survives a full GC pass, so later passes skip it; "
                    "one pass in this many seconds walks it all (0: CPython's collector as is)",
    )
    stall_timeout_s: float = Field(
        300.0, gt=0, description="/health answers 503 once calls have waited this long "
        "while no call was dispatched or ended (a wedged scheduler)"
    )
    shutdown_grace_s: float = Field(
        4.0, ge=0, description="on SIGTERM, requests in flight get this long to finish, then "
        "they are aborted; the process exits within about twice this"
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    sim: SimConfig = Field(default_factory=SimConfig)
    torch: TorchConfig = Field(default_factory=TorchConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    http_engine: HTTPEngineConfig = Field(default_factory=HTTPEngineConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)
    tools: ToolsConfig = Field(default_factory=ToolsConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (flags and file, merged by `load_settings`) beats the environment.
        return init_settings, env_settings


def read_config_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional file plus explicit overrides (e.g. CLI flags).

    `overrides` may be nested dicts (`scheduler={"policy": "plas"}`); None values are
    dropped so that an unset flag never hides the environment or the file.
    """
    base = read_config_file(config_file) if config_file else {}
    if base:
        # The environment beats the file: lay what the environment sets over the file.
        from_env = Settings().model_dump(exclude_unset=True)
        base = deep_merge(base, from_env)
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**deep_merge(base, clean))
