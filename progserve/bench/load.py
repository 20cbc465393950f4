"""Load test: N concurrent agent programs through the real HTTP server; none may be lost.

`progserve bench load --programs 2000` starts `progserve serve --engine sim` in a
subprocess (real time, timings compressed by `--time-scale`), or targets `--url`, and
drives every program at once from `--clients` client processes (asyncio + one HTTP/1.1
keep-alive pool each: a Python client tops out near 400 requests/s per core, so the load
is spread over processes). Half the programs, by default, are graph programs over the
native API (a chain of `--calls` LLM calls submitted at once, then a wait on the last
variable and an `end`); the other half are multi-turn OpenAI-proxy programs
(`--calls` chat completions tagged `X-Program-Id`, the conversation growing each turn,
the last one with `X-Program-End`).

A 429 is honoured (`Retry-After`, then the same request again), so admission control
shapes the load instead of failing it. A connection that cannot be opened is opened
again; one that breaks before the answer is resent only when that is safe (reads, `end`,
or a POST the server confirms it never saw). `--rounds R` repeats the load on the same
server and reports RSS after each round. Each program ends as
- completed: every step answered 200 and the program is `finished` on the server;
- failed: the server answered with a clear error (a documented 4xx/5xx body);
- lost: no clear answer (connection dropped, timeout, malformed reply), or the server
  still holds the program unfinished after the run. The target is 0.

Reported: the three counts, program latency (submit to last answer) and request latency
p50/p99, 429s, throughput, and the server's RSS before (idle, after a warm-up), during
(peak) and after the run (after `--settle` seconds), from /proc/PID/status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import statistics
import threading
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .server_process import ServerProcess, progserve_process

COMPLETED, FAILED, LOST = "completed", "failed", "lost"
RETRY_AFTER_CAP_S = 5.0
MAX_RETRIES_429 = 100
CONNECT_RETRIES = 8
MAX_LOST_LISTED = 20  # lost programs named in the report

def client_limits(programs: int) -> Any:
    """The client's connection pool: room for every program at once, and no keep-alive
    expiry. With an expiry, httpcore's pool (1.0.9; encode/httpcore#1110) can close an
    expired idle connection it has already handed to a request that has not started yet:
    when the client's loop stalls past the expiry between the two, another request's
    sweep closes the socket under the first one after it was sent, and the server's
    answer is lost (a `ReadError` on a request the server ran: seen as lost chats under
    2,000 programs on two cores). Without an expiry the pool only drops a connection the
    server closed (its keep-alive, 30 s), and a request caught by that was never read by
    the server, so it is resent safely (`ProgramDriver.request`)."""
    import httpx

    return httpx.Limits(max_connections=programs + 8, max_keepalive_connections=programs + 8,
                        keepalive_expiry=None)


# ----------------------------------------------------------------------------- config


@dataclass(slots=True)
class LoadConfig:
    programs: int = 2000
    calls: int = 3
    api: str = "mix"  # native | openai | mix
    max_tokens: int = 16
    clients: int = 2
    timeout_s: float = 1200.0
    time_scale: float = 0.1
    stream_interval: int = 4
    replicas: int = 1
    policy: str | None = None
    keep_finished: int | None = None  # None: the server's defaults
    settle_s: float = 3.0
    warmup: int = 20
    rounds: int = 1


@dataclass(slots=True)
class ProgramResult:
    program_id: str
    api: str
    outcome: str
    latency_s: float
    requests: int
    rejected: int = 0
    resent: int = 0
    error: str | None = None


@dataclass(slots=True)
class LoadReport:
    programs: int
    completed: int
    failed: int
    lost: int
    rejected_429: int
    resent: int
    requests: int
    wall_s: float
    programs_per_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    request_p50_ms: float
    request_p99_ms: float
    rss_before_mb: float | None
    rss_during_mb: float | None
    rss_after_mb: float | None
    server_unfinished: int
    rss_after_rounds_mb: list[float] = field(default_factory=list)
    # RSS after the last round over RSS after the first, minus 1, in % (memory that keeps
    # growing round after round is a leak; bounded caches filling show as a shrinking step)
    rss_growth_after_first_round_pct: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    # The first lost programs by id, with their error: what a server log is searched by.
    lost_programs: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- client


def _retry_after(headers: Any) -> float:
    try:
        return min(RETRY_AFTER_CAP_S, max(0.05, float(headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


class ClearError(Exception):
    """The server answered with a documented error: the program failed, it was not lost."""


class ProgramDriver:
    """Runs one program against a server through a shared keep-alive pool."""

    def __init__(self, client: Any, cfg: LoadConfig, latencies: list[float]) -> None:
        self.client = client
        self.cfg = cfg
        self.latencies = latencies  # every request's, shared by the process's programs
        self.requests = 0
        self.rejected = 0
        self.resent = 0  # requests sent again: the connection broke before they arrived

    async def request(self, method: str, path: str, *,
                      arrived: Callable[[], Awaitable[bool | None]] | None = None,
                      **kwargs: Any) -> Any:
        """One request; 429s are waited out and retried. A non-2xx with an error body
        raises `ClearError`; anything else (no answer, garbage) propagates: lost.

        A connection that breaks before the answer (the server closed a keep-alive
        connection the client was reusing) is resent only when that is safe: a read or an
        `end` always; a POST that creates work only if `arrived()` says the server never
        saw it (False); True (it ran, its answer is gone) or None (cannot tell) is lost."""
        import httpx

        for _ in range(MAX_RETRIES_429):
            start = time.perf_counter()
            try:
                resp = await self._send(method, path, **kwargs)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
                safe = method == "GET" or path.endswith("/end")
                if not safe:
                    seen = None if arrived is None else await arrived()
                    if seen is not False:
                        verdict = "saw it" if seen else "cannot tell whether it saw it"
                        call = (kwargs.get("headers") or {}).get("X-Call-Id")
                        where = f", call {call}" if call else ""
                        raise type(exc)(f"{exc} (the server {verdict}{where})") from exc
                self.resent += 1
                continue
            self.latencies.append(time.perf_counter() - start)
            self.requests += 1
            if resp.status_code == 429:
                self.rejected += 1
                await asyncio.sleep(_retry_after(resp.headers))
                continue
            body = resp.json()  # a malformed body raises: that is a lost answer
            if resp.status_code >= 400:
                raise ClearError(_error_text(resp.status_code, body))
            return body
        raise ClearError("429 after every retry")

    async def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        """A connection that could not be opened carried no request: open another (a
        server busy with thousands of connections may accept late). Any later error
        propagates: the request may have reached the server, so it is not repeated."""
        import httpx

        for attempt in range(CONNECT_RETRIES):
            try:
                return await self.client.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
                if attempt == CONNECT_RETRIES - 1:
                    raise
                await asyncio.sleep(min(5.0, 0.1 * 2 ** attempt))
            except httpx.HTTPError as exc:  # name the request in the report
                raise type(exc)(f"{method} {path.rsplit('/', 1)[0]}/...: {exc}") from exc
        raise AssertionError("unreachable")

    async def native(self, program_id: str) -> None:
        calls = [{"id": "c0", "prompt": f"Task {program_id}: make a plan.", "output": "v0",
                  "sampling": self._sampling()}]
        for i in range(1, self.cfg.calls):
            calls.append({"id": f"c{i}", "prompt": f"Step {i} after: {{{{v{i - 1}}}}}",
                          "output": f"v{i}", "sampling": self._sampling()})
        await self.request("POST", "/v1/programs", arrived=lambda: self._known(program_id),
                           json={"program_id": program_id, "calls": calls})
        last = f"v{self.cfg.calls - 1}"
        await self.request("GET", f"/v1/programs/{program_id}/variables/{last}",
                           params={"timeout": self.cfg.timeout_s})
        await self.request("POST", f"/v1/programs/{program_id}/end")

    async def openai(self, program_id: str) -> None:
        messages = [{"role": "system", "content": "You are a careful agent."},
                    {"role": "user", "content": f"Task {program_id}: begin."}]
        for turn in range(self.cfg.calls):
            call_id = f"turn-{turn}"
            headers = {"X-Program-Id": program_id, "X-Call-Id": call_id}
            ending = turn == self.cfg.calls - 1
            if ending:
                headers["X-Program-End"] = "true"

            async def arrived(call_id: str = call_id, first: bool = turn == 0,
                              ending: bool = ending) -> bool | None:
                known = await self._calls_of(program_id)
                if known is None:  # no such program: only a first call could have made it
                    return False if first and not ending else None
                return call_id in known

            body = await self.request(
                "POST", "/v1/chat/completions", headers=headers, arrived=arrived,
                json={"model": "sim", "messages": messages, "max_tokens": self.cfg.max_tokens})
            reply = body["choices"][0]["message"]["content"] or ""
            messages += [{"role": "assistant", "content": reply},
                         {"role": "user", "content": f"Observation {turn}: continue."}]

    async def _calls_of(self, program_id: str) -> set[str] | None:
        """The server's call ids of a program (None: it does not know the program)."""
        resp = await self._send("GET", f"/v1/programs/{program_id}")
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        return {call["id"] for call in resp.json()["calls"]}

    async def _known(self, program_id: str) -> bool:
        return await self._calls_of(program_id) is not None

    def _sampling(self) -> dict[str, Any]:
        return {"max_new_tokens": self.cfg.max_tokens}

    async def run(self, program_id: str, api: str) -> ProgramResult:
        start = time.perf_counter()
        outcome, error = COMPLETED, None
        try:
            await asyncio.wait_for(
                self.native(program_id) if api == "native" else self.openai(program_id),
                self.cfg.timeout_s)
        except ClearError as exc:
            outcome, error = FAILED, str(exc)
        except Exception as exc:  # noqa: BLE001 - no clear answer: the program is lost
            outcome, error = LOST, f"{type(exc).__name__}: {exc}"[:300]
        return ProgramResult(program_id, api, outcome, time.perf_counter() - start,
                             self.requests, self.rejected, self.resent, error)


def _error_text(status: int, body: Any) -> str:
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict):
            return f"{status} {body['error'].get('code') or body['error'].get('type')}"
        if "detail" in body:
            return f"{status} {body.get('code') or body.get('title')}"
    return f"{status} (undocumented error body)"


def api_of(index: int, api: str) -> str:
    if api == "mix":
        return "native" if index % 2 == 0 else "openai"
    return api


async def _client_main(url: str, cfg: LoadConfig, jobs: list[tuple[str, str]],
                       progress: Any, ready: Any, go: Any
                       ) -> tuple[list[ProgramResult], list[float]]:
    import httpx

    limits = client_limits(len(jobs))
    timeout = httpx.Timeout(cfg.timeout_s + 30, connect=30.0)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout,
                                 trust_env=False) as client:
        count = {"done": 0, "sent": 0}

        async def one(program_id: str, api: str) -> ProgramResult:
            result = await ProgramDriver(client, cfg, latencies).run(program_id, api)
            count["done"] += 1
            return result

        def flush() -> None:
            if count["done"] > count["sent"]:
                progress.put(count["done"] - count["sent"])
                count["sent"] = count["done"]

        async def report() -> None:
            while True:  # batched: one queue message per 0.2 s, not one per program
                await asyncio.sleep(0.2)
                flush()

        ready.put(os.getpid())
        await asyncio.to_thread(go.wait)  # every client starts at the same moment
        reporter = asyncio.get_running_loop().create_task(report())
        results = await asyncio.gather(*(one(pid, api) for pid, api in jobs))
        reporter.cancel()
        flush()
    return list(results), latencies


def _client_process(url: str, cfg_dict: dict[str, Any], jobs: list[tuple[str, str]],
                    progress: Any, results: Any, ready: Any, go: Any) -> None:
    cfg = LoadConfig(**cfg_dict)
    out, latencies = asyncio.run(_client_main(url, cfg, jobs, progress, ready, go))
    results.put(([asdict(r) for r in out], latencies))


# ----------------------------------------------------------------------------- server


def server_under_test(cfg: LoadConfig, log_path: Path | None) -> ServerProcess:
    """`progserve serve --engine sim` in a subprocess on a free port (not started)."""
    env = {"PROGSERVE_SIM__TIME_SCALE": str(cfg.time_scale),
           "PROGSERVE_SIM__STREAM_INTERVAL": str(cfg.stream_interval),
           "PROGSERVE_MODEL_ALIASES": '["sim"]'}  # the model its chats name
    if cfg.keep_finished is not None:  # finished programs and traces kept in memory
        env["PROGSERVE_SCHEDULER__KEEP_FINISHED_PROGRAMS"] = str(cfg.keep_finished)
        env["PROGSERVE_SCHEDULER__KEEP_FINISHED_CALLS"] = str(cfg.keep_finished * cfg.calls)
        env["PROGSERVE_OBSERVABILITY__TRACE_MAX_PROGRAMS"] = str(max(10, cfg.keep_finished))
        env["PROGSERVE_OBSERVABILITY__TRACE_MAX_SPANS"] = str(max(100, 10 * cfg.keep_finished))
    flags = ["--engine", "sim", "--replicas", str(cfg.replicas), "--log-level", "warning"]
    if cfg.policy:
        flags += ["--policy", cfg.policy]
    return progserve_process(*flags, env=env, log=log_path)


def rss_mb(pid: int) -> float | None:
    """Resident set size of a process, from /proc (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid = pid
        self.interval = interval_s
        self.peak = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            value = rss_mb(self.pid)
            if value is not None:
                self.peak = max(self.peak, value)

    def stop(self) -> float:
        self._stop_event.set()
        self.join(2)
        return self.peak


def server_unfinished(url: str, ids: set[str]) -> int:
    """Programs of this run that the server still holds in a non-final state."""
    try:
        with urllib.request.urlopen(url + "/v1/programs", timeout=30) as resp:
            data = json.loads(resp.read())
    except OSError:
        return -1
    return sum(1 for p in data.get("data", ())
               if p["id"] in ids and p["status"] not in ("finished", "failed", "cancelled"))


# ----------------------------------------------------------------------------- run


def run_load(cfg: LoadConfig, url: str | None = None, *, log_path: Path | None = None,
             show_progress: bool = True) -> LoadReport:
    server = None
    if url is None:
        server = server_under_test(cfg, log_path)
        try:
            server.start(timeout_s=90.0)
        except RuntimeError as exc:
            server.close()
            raise SystemExit(str(exc)) from None
        url = server.url
    try:
        return _run_against(url, cfg, server, show_progress)
    finally:
        if server is not None:
            server.close()


def _run_against(url: str, cfg: LoadConfig, server: ServerProcess | None,
                 show_progress: bool) -> LoadReport:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    run_id = uuid.uuid4().hex[:8]
    if cfg.warmup:  # lazy imports, pools, first compiles: kept out of the baseline
        warm = LoadConfig(**{**asdict(cfg), "programs": cfg.warmup, "clients": 1})
        _drive(url, warm, [(f"warm-{run_id}-{i}", api_of(i, cfg.api))
                           for i in range(cfg.warmup)], None, None)
        time.sleep(cfg.settle_s)
    pid = server.proc.pid if server is not None else None
    before = rss_mb(pid) if pid else None
    results: list[ProgramResult] = []
    latencies: list[float] = []
    wall = 0.0
    peak: float | None = None
    after_rounds: list[float] = []
    for round_index in range(cfg.rounds):  # same server: growth between rounds = a leak
        sampler = RssSampler(pid) if pid else None
        jobs = [(f"load-{run_id}-r{round_index}-{i}", api_of(i, cfg.api))
                for i in range(cfg.programs)]
        if show_progress:
            columns = (TextColumn(f"[bold]load {round_index + 1}/{cfg.rounds}[/]"),
                       BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, transient=True) as bar:
                task = bar.add_task("programs", total=cfg.programs)
                got, lats, took = _drive(url, cfg, jobs, lambda n, t=task: bar.advance(t, n),
                                         sampler)
        else:
            got, lats, took = _drive(url, cfg, jobs, None, sampler)
        results += got
        latencies += lats
        wall += took
        if sampler is not None:
            peak = max(peak or 0.0, sampler.stop())
        time.sleep(cfg.settle_s)
        if pid:
            after_rounds.append(rss_mb(pid) or 0.0)
    completed_ids = {r.program_id for r in results if r.outcome == COMPLETED}
    stuck = server_unfinished(url, completed_ids)
    report = _report(cfg, results, latencies, wall, before, peak,
                     after_rounds[-1] if after_rounds else None, stuck)
    rounds = report.rss_after_rounds_mb = [round(v, 1) for v in after_rounds]
    if len(rounds) > 1 and rounds[0]:  # from the figures reported, so it can be checked
        report.rss_growth_after_first_round_pct = round(100 * (rounds[-1] / rounds[0] - 1), 1)
    return report


def _drive(url: str, cfg: LoadConfig, jobs: list[tuple[str, str]], advance: Any,
           sampler: RssSampler | None) -> tuple[list[ProgramResult], list[float], float]:
    """Split the programs over client processes, start them all at one moment (after
    their imports), gather their results. Returns results, request latencies, wall s."""
    ctx = mp.get_context("spawn")
    progress, results, ready, go = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Event()
    n = max(1, min(cfg.clients, len(jobs)))
    procs = [ctx.Process(target=_client_process, daemon=True,
                         args=(url, asdict(cfg), jobs[i::n], progress, results, ready, go))
             for i in range(n)]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=120)
    if sampler is not None:
        sampler.start()
    start = time.perf_counter()
    go.set()
    out: list[ProgramResult] = []
    latencies: list[float] = []
    pending = n
    deadline = time.monotonic() + cfg.timeout_s + 120
    while pending and time.monotonic() < deadline:
        _drain_progress(progress, advance)
        try:
            batch, lats = results.get(timeout=0.1)
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                break  # a client died: its programs count as lost below
            continue
        out += [ProgramResult(**r) for r in batch]
        latencies += lats
        pending -= 1
    wall = time.perf_counter() - start
    _drain_progress(progress, advance)
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    seen = {r.program_id for r in out}
    out += [ProgramResult(pid, api, LOST, cfg.timeout_s, 0, error="client process died")
            for pid, api in jobs if pid not in seen]
    return out, latencies, wall


def _drain_progress(progress: Any, advance: Any) -> None:
    while True:
        try:
            n = progress.get_nowait()
        except queue.Empty:
            return
        if advance is not None:
            advance(n)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _report(cfg: LoadConfig, results: list[ProgramResult], latencies: list[float],
            wall: float, before: float | None, during: float | None, after: float | None,
            stuck: int) -> LoadReport:
    counts = {k: sum(1 for r in results if r.outcome == k) for k in (COMPLETED, FAILED, LOST)}
    # A program the client saw complete but the server still holds open is lost too.
    lost = counts[LOST] + max(0, stuck)
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    program_lat = [r.latency_s for r in results if r.outcome == COMPLETED]
    requests = sum(r.requests for r in results)
    return LoadReport(
        programs=len(results),
        completed=counts[COMPLETED] - max(0, stuck),
        failed=counts[FAILED],
        lost=lost,
        rejected_429=sum(r.rejected for r in results),
        resent=sum(r.resent for r in results),
        requests=requests,
        wall_s=round(wall, 3),
        programs_per_s=round(len(results) / wall, 1) if wall else 0.0,
        requests_per_s=round(requests / wall, 1) if wall else 0.0,
        p50_ms=round(_quantile(program_lat, 0.5) * 1e3, 1),
        p99_ms=round(_quantile(program_lat, 0.99) * 1e3, 1),
        mean_ms=round(statistics.fmean(program_lat) * 1e3, 1) if program_lat else 0.0,
        request_p50_ms=round(_quantile(latencies, 0.5) * 1e3, 1),
        request_p99_ms=round(_quantile(latencies, 0.99) * 1e3, 1),
        rss_before_mb=_round(before),
        rss_during_mb=_round(during),
        rss_after_mb=_round(after),
        server_unfinished=stuck,
        errors=dict(sorted(errors.items(), key=lambda kv: -kv[1])[:10]),
        lost_programs=[{"program_id": r.program_id, "api": r.api, "error": r.error}
                       for r in results if r.outcome == LOST][:MAX_LOST_LISTED],
        config=asdict(cfg),
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# ----------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = LoadConfig()
    parser.add_argument("--programs", type=int, default=defaults.programs,
                        help="programs, all started at once (default 2000)")
    parser.add_argument("--calls", type=int, default=defaults.calls,
                        help="LLM calls per program (default 3)")
    parser.add_argument("--api", choices=("mix", "native", "openai"), default=defaults.api,
                        help="native graph programs, OpenAI-proxy programs, or half each")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--clients", type=int, default=defaults.clients,
                        help="client processes (each an asyncio loop with one pool)")
    parser.add_argument("--time-scale", type=float, default=defaults.time_scale,
                        help="sim engine time compression (0.1 = 10x faster than real)")
    parser.add_argument("--stream-interval", type=int, default=defaults.stream_interval,
                        help="sim tokens per streamed chunk (default 4)")
    parser.add_argument("--keep-finished", type=int, default=None, metavar="N",
                        help="finished programs (and traces) the server keeps for queries; "
                        "default: the server's own (10,000 programs holding at most 5,000 calls; "
                        "5,000 program summaries and 10,000 spans)")
    parser.add_argument("--replicas", type=int, default=defaults.replicas)
    parser.add_argument("--policy", default=None, help="scheduling policy of the server")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s,
                        help="seconds a program may take before it counts as lost")
    parser.add_argument("--settle", type=float, default=defaults.settle_s,
                        help="seconds after the run before RSS is read again")
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--rounds", type=int, default=defaults.rounds,
                        help="run the load this many times on the same server; RSS after "
                        "each round shows whether memory keeps growing")
    parser.add_argument("--url", default=None,
                        help="drive a running server instead of starting one (no RSS)")
    parser.add_argument("--server-log", type=Path, default=None, metavar="FILE")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    if min(args.programs, args.calls, args.clients, args.rounds) < 1:
        raise SystemExit("--programs, --calls, --clients and --rounds must be at least 1")
    cfg = LoadConfig(programs=args.programs, calls=args.calls, api=args.api,
                     max_tokens=args.max_tokens, clients=args.clients, timeout_s=args.timeout,
                     time_scale=args.time_scale, stream_interval=args.stream_interval,
                     replicas=args.replicas, policy=args.policy,
                     keep_finished=args.keep_finished, settle_s=args.settle,
                     warmup=args.warmup, rounds=args.rounds)
    report = run_load(cfg, args.url, log_path=args.server_log,
                      show_progress=not args.no_progress)
    console = Console()
    rounds = f", {cfg.rounds} rounds" if cfg.rounds > 1 else ""
    table = Table(title=f"progserve bench load: {cfg.programs} concurrent programs "
                  f"({cfg.api}, {cfg.calls} calls each{rounds})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("completed", report.completed), ("failed", report.failed), ("lost", report.lost),
            ("429 answers (retried)", report.rejected_429),
            ("resent (connection broke before the request arrived)", report.resent),
            ("requests", report.requests),
            ("wall s", report.wall_s), ("programs/s", report.programs_per_s),
            ("requests/s", report.requests_per_s),
            ("program latency p50 / p99 ms", f"{report.p50_ms} / {report.p99_ms}"),
            ("request latency p50 / p99 ms",
             f"{report.request_p50_ms} / {report.request_p99_ms}"),
            ("server RSS MB before / peak / after",
             f"{report.rss_before_mb} / {report.rss_during_mb} / {report.rss_after_mb}")]
    if cfg.rounds > 1:
        rows.append(("server RSS MB after each round",
                     " / ".join(str(v) for v in report.rss_after_rounds_mb)))
        rows.append(("RSS growth after the first round %",
                     report.rss_growth_after_first_round_pct))
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
    if report.errors:
        console.print({"errors": report.errors})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.lost == 0 else 1
