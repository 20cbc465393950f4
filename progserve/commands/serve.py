"""Run the progserve server (OpenAI proxy, SGLang /generate, native program API).

Settings come from defaults < `--config FILE` (TOML or JSON) < `PROGSERVE_*` environment
variables < these flags. uvloop and httptools are used when installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from scheduler.policies import DEFAULT_POLICY, POLICY_NAMES

ENGINES = ("sim", "torch", "sglang", "openai")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="settings file, TOML or JSON (flags and env override it)")
    parser.add_argument("--engine", choices=ENGINES,
                        help="engine behind progserve (default: sim, embedded)")
    parser.add_argument("--engine-url", action="append", metavar="URL", dest="engine_url",
                        help="engine server URL for sglang/openai; repeat once per replica")
    parser.add_argument("--sglang-priority-file", type=Path, metavar="FILE",
                        help="sglang: write KV retention hints (pins, ended programs) here "
                        "for progserve's SGLang plugin (the servers' PROGSERVE_PRIORITY_FILE); "
                        "a directory lets several progserve processes share the servers")
    parser.add_argument("--model", help="model served: a name, or the model directory (torch)")
    parser.add_argument("--replicas", type=int, help="embedded engine replicas (sim/torch)")
    parser.add_argument("--policy", choices=POLICY_NAMES,
                        help=f"scheduling policy (default: {DEFAULT_POLICY})")
    parser.add_argument("--redis-url", help="share program history in Redis (redis://host:port)")
    parser.add_argument("--otlp-endpoint", metavar="URL",
                        help="also export traces over OTLP/HTTP, e.g. http://collector:4318 "
                        "(needs progserve[otlp])")
    parser.add_argument("--host", help="bind address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: 30080)")
    parser.add_argument("--api-keys", type=Path, metavar="FILE",
                        help="JSON of sha256(key) -> tenant; enables authentication")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        help="log level (default: info)")
    parser.add_argument("--no-prefix-cache", action="store_true",
                        help="torch engine: never reuse cached prefix KV (for A/B checks)")
    parser.add_argument("--access-log", action="store_true",
                        help="log every request (off by default: it costs latency)")


def settings_from_args(args: argparse.Namespace) -> Any:
    from progserve.config import load_settings

    overrides: dict[str, Any] = {
        "engine": args.engine,
        "engine_url": args.engine_url,
        "model": args.model,
        "replicas": args.replicas,
        "redis_url": args.redis_url,
        "otlp_endpoint": getattr(args, "otlp_endpoint", None),
        "host": args.host,
        "port": args.port,
        "api_keys": args.api_keys,
        "log_level": args.log_level,
    }
    if args.policy:
        overrides["scheduler"] = {"policy": args.policy}
    if getattr(args, "no_prefix_cache", False):
        overrides["torch"] = {"prefix_cache": False}
    if getattr(args, "sglang_priority_file", None) is not None:
        overrides["http_engine"] = {"sglang_priority_file": args.sglang_priority_file}
    return load_settings(args.config, **overrides)


def uvicorn_options(log_level: str, access_log: bool) -> dict[str, Any]:
    http: Any = "h11"
    if importlib.util.find_spec("httptools"):  # one write per answer: progserve/http_protocol.py
        from progserve.http_protocol import CoalescingHttpToolsProtocol
        http = CoalescingHttpToolsProtocol
    return {
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": http,
        "log_level": log_level,
        "access_log": access_log,
        "timeout_keep_alive": 30,
        "lifespan": "on",
    }


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from progserve.app import create_app
    from progserve.auth import KeyFileError
    from progserve.engines import EngineConfigError
    from progserve.probe import probe_in_background
    from progserve.runtime import ServerRuntime

    try:
        settings = settings_from_args(args)
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        runtime = ServerRuntime(settings)
    except (ValidationError, EngineConfigError, KeyFileError, OSError, ValueError) as exc:
        print(f"progserve serve: {exc}", file=sys.stderr)
        return 2
    probe_in_background(settings, logging.getLogger("progserve.probe"))
    app = create_app(runtime)
    app.state.tune_collector = True  # a server process: see progserve/gc_tuning.py
    # On SIGTERM, requests in flight get `shutdown_grace_s`, then are cancelled (aborting
    # their engine requests) and the app shuts down: the process always exits.
    uvicorn.run(app, host=settings.host, port=settings.port,
                timeout_graceful_shutdown=settings.shutdown_grace_s,
                **uvicorn_options(settings.log_level, args.access_log))
    return 0
