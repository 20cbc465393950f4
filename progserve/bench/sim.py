"""Sim engine benchmark: N synthetic requests with shared prefixes, in virtual time.

The trace is deterministic for a seed. Conversations arrive by a Poisson process (so
requests arrive at about `--rate` per simulated second). Each starts from one of a few
shared system prompts and runs `--turns` turns: the prompt of a turn is the whole
conversation so far (system prompt, earlier user messages and the engine's actual
replies) plus a new user message, sent after an exponential think time. Output lengths
are exponential with mean `--output-tokens`, registered with the synthetic responder
(the engine itself does not know them in advance). The report gives the wall time, the
simulated time, throughput, the prefix-cache hit rate and the preemptions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine_backend.sim import SimConfig, SimEngine, SyntheticResponder
from engine_backend.sim.tokenizer import FIRST_SPECIAL_ID
from engine_backend.types import GenerateRequest, SamplingParams
from engine_backend.virtual_time import run_virtual

DEFAULTS = SimConfig()


@dataclass(slots=True)
class WorkloadConfig:
    requests: int = 10_000
    rate: float = 20.0  # requests per simulated second
    seed: int = 0
    system_prompts: int = 16
    system_tokens: int = 1024
    turns: int = 4
    user_tokens: int = 96  # mean of an exponential
    output_tokens: int = 128  # mean of an exponential
    max_new_tokens: int = 1024
    think_time: float = 3.0  # mean seconds between a reply and the next user turn


@dataclass(slots=True)
class RequestRecord:
    arrival: float
    finish: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class BenchResult:
    requests: int
    wall_s: float
    sim_s: float
    requests_per_sim_s: float
    output_tokens_per_sim_s: float
    requests_per_wall_s: float
    cache_hit_rate: float
    preemptions: int
    recomputed_tokens: int
    mean_latency_s: float
    p50_latency_s: float
    p99_latency_s: float
    prompt_tokens: int
    completion_tokens: int
    workload: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)


class Workload:
    """Draws the trace: system prompts, user messages, output lengths, think times."""

    def __init__(self, config: WorkloadConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.system_prompts = [
            self.tokens(config.system_tokens) for _ in range(config.system_prompts)
        ]

    def tokens(self, n: int) -> list[int]:
        raw = array("I", self.rng.randbytes(4 * n))
        return [x % FIRST_SPECIAL_ID for x in raw]

    def exponential(self, mean: float, low: int = 1) -> int:
        return max(low, int(self.rng.expovariate(1.0 / mean)))


async def _conversation(
    engine: SimEngine,
    responder: SyntheticResponder,
    workload: Workload,
    cid: int,
    turns: int,
    start: float,
    records: list[RequestRecord],
    on_done: Any,
) -> None:
    config = workload.config
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start - loop.time()))
    context = list(workload.system_prompts[cid % len(workload.system_prompts)])
    for turn in range(turns):
        context += workload.tokens(workload.exponential(config.user_tokens))
        rid = f"c{cid}-t{turn}"
        responder.expect(rid, workload.exponential(config.output_tokens))
        think = workload.rng.expovariate(1.0 / config.think_time)
        request = GenerateRequest(
            rid=rid,
            input_ids=context,
            sampling=SamplingParams(max_new_tokens=config.max_new_tokens),
            program_id=f"c{cid}",
        )
        arrival = loop.time()
        async for chunk in engine.generate(request):
            context = context + chunk.token_ids
            if chunk.finished:
                records.append(RequestRecord(arrival, loop.time(), chunk.prompt_tokens,
                                             chunk.cached_tokens, chunk.completion_tokens))
        on_done()
        if turn + 1 < turns:
            await asyncio.sleep(think)


async def simulate(
    workload_config: WorkloadConfig, sim_config: SimConfig, progress: Progress | None = None
) -> BenchResult:
    workload = Workload(workload_config)
    engine = SimEngine(sim_config)
    responder = engine.responder
    if not isinstance(responder, SyntheticResponder):
        raise SystemExit("bench sim needs the synthetic responder (unset sim.script_file)")
    records: list[RequestRecord] = []
    task_id = progress.add_task("sim", total=workload_config.requests) if progress else None

    def on_done() -> None:
        if progress is not None and task_id is not None:
            progress.advance(task_id)

    loop = asyncio.get_running_loop()
    wall0, sim0 = time.perf_counter(), loop.time()
    conversation_rate = workload_config.rate / workload_config.turns
    async with engine:
        tasks = []
        arrival, remaining, cid = sim0, workload_config.requests, 0
        while remaining > 0:
            arrival += workload.rng.expovariate(conversation_rate)
            turns = min(workload_config.turns, remaining)
            tasks.append(asyncio.ensure_future(_conversation(
                engine, responder, workload, cid, turns, arrival, records, on_done)))
            remaining -= turns
            cid += 1
        await asyncio.gather(*tasks)
        stats = await engine.stats()
    wall = time.perf_counter() - wall0
    sim = loop.time() - sim0
    latencies = sorted(r.finish - r.arrival for r in records)
    completion = sum(r.completion_tokens for r in records)
    return BenchResult(
        requests=len(records),
        wall_s=wall,
        sim_s=sim,
        requests_per_sim_s=len(records) / sim if sim else 0.0,
        output_tokens_per_sim_s=completion / sim if sim else 0.0,
        requests_per_wall_s=len(records) / wall if wall else 0.0,
        cache_hit_rate=stats.cache_hit_rate,
        preemptions=stats.preemptions,
        recomputed_tokens=stats.recomputed_tokens,
        mean_latency_s=statistics.fmean(latencies),
        p50_latency_s=_quantile(latencies, 0.5),
        p99_latency_s=_quantile(latencies, 0.99),
        prompt_tokens=sum(r.prompt_tokens for r in records),
        completion_tokens=completion,
        workload=asdict(workload_config),
        engine=sim_config.model_dump(mode="json"),
    )


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def configure(parser: argparse.ArgumentParser) -> None:
    w = WorkloadConfig()
    parser.add_argument("--requests", type=int, default=w.requests)
    parser.add_argument("--rate", type=float, default=w.rate, help="requests per simulated s")
    parser.add_argument("--seed", type=int, default=w.seed)
    parser.add_argument("--system-prompts", type=int, default=w.system_prompts)
    parser.add_argument("--system-tokens", type=int, default=w.system_tokens)
    parser.add_argument("--turns", type=int, default=w.turns, help="requests per conversation")
    parser.add_argument("--user-tokens", type=int, default=w.user_tokens)
    parser.add_argument("--output-tokens", type=int, default=w.output_tokens)
    parser.add_argument("--max-new-tokens", type=int, default=w.max_new_tokens)
    parser.add_argument("--think-time", type=float, default=w.think_time)
    parser.add_argument("--kv-capacity", type=int, default=DEFAULTS.kv_capacity_tokens)
    parser.add_argument("--max-running", type=int, default=DEFAULTS.max_running)
    parser.add_argument("--eviction", choices=["lru", "priority"], default=DEFAULTS.eviction)
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    workload = WorkloadConfig(
        requests=args.requests, rate=args.rate, seed=args.seed,
        system_prompts=args.system_prompts, system_tokens=args.system_tokens,
        turns=args.turns, user_tokens=args.user_tokens, output_tokens=args.output_tokens,
        max_new_tokens=args.max_new_tokens, think_time=args.think_time,
    )
    sim_config = SimConfig(
        kv_capacity_tokens=args.kv_capacity, max_running=args.max_running,
        eviction=args.eviction, seed=args.seed, stream_interval=0,
    )
    console = Console()
    progress = Progress(
        TextColumn("[bold]bench sim"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=args.no_progress,
    )
    with progress:
        result = run_virtual(simulate(workload, sim_config, progress))
    table = Table(title=f"sim engine: {result.requests} requests (virtual time)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("wall seconds", f"{result.wall_s:.2f}"),
        ("simulated seconds", f"{result.sim_s:.1f}"),
        ("requests / simulated s", f"{result.requests_per_sim_s:.1f}"),
        ("output tokens / simulated s", f"{result.output_tokens_per_sim_s:.0f}"),
        ("requests / wall s", f"{result.requests_per_wall_s:.0f}"),
        ("cache hit rate", f"{result.cache_hit_rate:.1%}"),
        ("preemptions", str(result.preemptions)),
        ("recomputed tokens", str(result.recomputed_tokens)),
        ("latency mean / p50 / p99 (s)",
         f"{result.mean_latency_s:.2f} / {result.p50_latency_s:.2f} / {result.p99_latency_s:.2f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(result), indent=2))
        console.print(f"wrote {args.json}")
    return 0
