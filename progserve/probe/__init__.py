"""What an engine server can do, found by asking it: `probe_engine(engine, url)` sends a
few small requests and returns a `ProbeReport` (one boolean and a one-line reason per
feature in `FEATURES`). `progserve probe` prints it; `progserve serve` runs it at start-up
for HTTP engines and logs what it will do differently (`log_report`).

Modules: `http` (the client; failures become answers), `dialects` (OpenAI completions vs
SGLang /generate), `checks` (one check per feature), `report` (the result).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from typing import Any

from .checks import (
    ProbeContext,
    check_cache,
    check_chat,
    check_chat_template,
    check_completions,
    check_logprobs,
    check_priority,
    check_stream,
    check_tool_calls,
)
from .dialects import DIALECTS
from .http import ProbeClient
from .report import CONSEQUENCES, FEATURES, Finding, ProbeReport, missing

__all__ = ["FEATURES", "CONSEQUENCES", "Finding", "ProbeReport", "probe_engine", "log_report",
           "probe_in_background"]


async def probe_engine(
    engine: str,
    url: str,
    *,
    model: str | None = None,
    api_key: str | None = None,
    timeout_s: float = 120.0,
    check_order: bool = True,
    chat_template: str | None = None,
    seed: int | None = None,
) -> ProbeReport:
    """Probe the server at `url` as `--engine engine` ("openai" or "sglang") would use it.
    `check_order=False` skips the priority-order check (the only one that queues calls);
    `chat_template` is a template source that replaces the model directory's."""
    if engine not in DIALECTS:
        raise ValueError(f"probe: unknown engine {engine!r} (openai or sglang)")
    started = time.monotonic()
    dialect = DIALECTS[engine]()
    base = url.rstrip("/").removesuffix("/v1") if engine == "openai" else url.rstrip("/")
    report = ProbeReport(engine=engine, url=url, model=model)
    client = ProbeClient(base, api_key=api_key, timeout_s=timeout_s)
    try:
        info = await dialect.identify(client, model)
        report.model = info.model
        if info.error:
            report.findings = {name: missing(info.error) for name in FEATURES}
            return report
        ctx = ProbeContext(client, dialect, info.model, info.max_len, random.Random(seed))
        await _run_checks(ctx, report, check_order=check_order, chat_template=chat_template)
    finally:
        await client.aclose()
        report.elapsed_s = time.monotonic() - started
    return report


async def _run_checks(ctx: ProbeContext, report: ProbeReport, *, check_order: bool,
                      chat_template: str | None) -> None:
    found = report.findings
    found["completions"] = await check_completions(ctx)
    found["chat"] = await check_chat(ctx)
    if found["completions"].ok:
        found["stream"], found["usage_in_stream"] = await check_stream(ctx)
        found["logprobs"], found["top_logprobs"] = await check_logprobs(ctx)
        found["cached_tokens"], found["cache_salt"] = await check_cache(ctx)
        found["priority"] = await check_priority(ctx, check_order=check_order,
                                                 details=report.details)
    else:
        why = f"not checked: completions do not work ({found['completions'].reason})"
        for name in ("stream", "usage_in_stream", "logprobs", "top_logprobs",
                     "cached_tokens", "cache_salt", "priority"):
            found[name] = missing(why)
    found["tool_calls"] = (await check_tool_calls(ctx, report.details) if found["chat"].ok
                           else missing("not checked: chat does not work"))
    found["chat_template"] = await check_chat_template(ctx, chat_template)


def log_report(report: ProbeReport, log: logging.Logger) -> None:
    """One line for what works, one warning per missing feature with its consequence."""
    if not report.speaks_protocol:
        log.error("engine probe: %s at %s answered no %s request: %s", report.engine,
                  report.url, report.engine, report.finding("completions").reason)
        return
    have = [name for name in FEATURES if report.finding(name).ok]
    log.info("engine probe: %s (%s) at %s in %.1f s: has %s", report.engine, report.model,
             report.url, report.elapsed_s, ", ".join(have) or "nothing")
    for name in report.absent():
        log.warning("engine probe: no %s (%s): %s", name, report.finding(name).reason,
                    CONSEQUENCES[name])


def probe_in_background(settings: Any, log: logging.Logger) -> threading.Thread | None:
    """`serve`'s start-up probe of each HTTP engine server (`settings.startup_probe`), in a
    thread of its own so the server starts at once. It skips the order check, the one that
    queues calls on the engine."""
    if settings.engine not in DIALECTS or not settings.startup_probe:
        return None

    def run() -> None:
        for url in settings.engine_url:
            try:
                report = asyncio.run(probe_engine(
                    settings.engine, url, model=settings.model,
                    api_key=settings.http_engine.api_key, timeout_s=60.0, check_order=False))
            except Exception as exc:  # noqa: BLE001 - a probe never stops the server
                log.warning("engine probe of %s failed: %s", url, exc)
                continue
            log_report(report, log)

    thread = threading.Thread(target=run, name="engine-probe", daemon=True)
    thread.start()
    return thread
