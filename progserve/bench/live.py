"""Live benchmark: the engine alone vs through progserve, on a real engine in real time, with the calibrated sim's prediction beside each figure.

`progserve bench live --engine torch|openai|sglang [--engine-url URL] --workload bfcl
--programs N --rate R [--rates R1,R2,...] --policies engine,atlas --hardware PROFILE
--json OUT [--plot OUT.png]`

The trace is the policy bench's (`workloads.generate_trace`), scaled to a CPU engine by
`--token-scale` and `--tool-scale` (`live_programs.py`). Every side replays the same
programs with the same Poisson arrivals, back to back, each against a fresh engine (torch)
or a reset cache (vLLM, where the server allows it):
- `engine`: each program's client calls the engine directly, one call after another with
  its tool gaps slept: the torch engine's `generate` in-process, or the server's OpenAI
  chat completions;
- a policy name: the same clients call an in-process progserve (uvicorn on a free port,
  the shipped default settings with that policy) in front of the same engine.
With `--rates`, the engine alone runs at each rate first and the knee is the lowest rate
whose mean program token latency is at least `--knee-factor` times the lowest rate's; every
side then runs there. With `--hardware` (`bench calibrate`'s profile) the sim replays the
same trace (`driver.run_trace`: the real scheduler over `SimEngine` with that profile, the
engine's KV and batch limits) and its predictions stand beside the measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine_backend.sim import SimConfig
from engine_backend.sim.config import HardwareProfile
from engine_backend.sim.cost_model import load_hardware_profile
from scheduler.config import SchedulerConfig
from scheduler.policies import BASELINE_POLICY, DEFAULT_POLICY, POLICY_NAMES

from .driver import BenchSetup, run_trace
from .live_clients import (
    DirectEngineCaller,
    OpenAICaller,
    counter_delta,
    engine_counters,
    served_model,
    server_root,
    vllm_counters,
)
from .live_programs import (
    DEFAULT_TOKEN_SCALE,
    DEFAULT_TOOL_SCALE,
    LIVE_PROGRAM_TYPES,
    LivePrograms,
    ProgramRecord,
    one_token_words,
    scaled_params,
)
from .metrics import latency_stats, percentile
from .workloads import Trace, generate_trace, parse_mix

ENGINE_SIDE = "engine"
KNEE_FACTOR = 2.0
# The sim's stand-in for "the engine alone": no progserve queue in the way (a budget no
# trace reaches), no retention, no admission, FCFS.
SIM_ENGINE_ALONE = dict(policy=BASELINE_POLICY, max_inflight_requests=100_000,
                        max_inflight_tokens=1 << 40, retain_kv=False, kv_admission=False,
                        pass_priority=False)
VLLM_KV_HINT = ("vLLM sets its KV size at start: VLLM_CPU_KVCACHE_SPACE takes whole GiB; "
                "for {tokens} tokens start it with --kv-cache-memory-bytes {bytes} "
                "({per_token} bytes per token) and --max-model-len below {tokens}")


# ---------------------------------------------------------------------------- CLI
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("torch", "openai", "sglang"), default="torch")
    parser.add_argument("--engine-url", default=None,
                        help="the engine server (openai: the base URL of its /v1 API)")
    parser.add_argument("--model", default=None,
                        help="torch: model dir (default: the embedded SmolLM2)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer dir for the prompt words (default: the model's; "
                             "openai/sglang: the embedded SmolLM2's)")
    parser.add_argument("--workload", choices=("chat", "bfcl", "mixed"), default="bfcl")
    parser.add_argument("--mix", default="chat=1,bfcl=1",
                        help="mixed: program types and weights (chat, bfcl)")
    parser.add_argument("--programs", type=int, default=24)
    parser.add_argument("--rate", type=float, default=None, help="programs/s")
    parser.add_argument("--rates", default=None,
                        help="comma-separated rates: find the engine alone's knee first")
    parser.add_argument("--knee-factor", type=float, default=KNEE_FACTOR)
    parser.add_argument("--policies", default=f"{ENGINE_SIDE},{DEFAULT_POLICY}",
                        help=f"comma-separated: {ENGINE_SIDE} and any of "
                             + ",".join(POLICY_NAMES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--kv-tokens", type=int, default=None,
                        help="torch: the KV pool (tokens); vLLM: printed as the flag to use")
    parser.add_argument("--max-running", type=int, default=None, help="torch: batch cap")
    parser.add_argument("--token-scale", type=float, default=DEFAULT_TOKEN_SCALE)
    parser.add_argument("--tool-scale", type=float, default=DEFAULT_TOOL_SCALE)
    parser.add_argument("--hardware", type=Path, default=None,
                        help="`bench calibrate`'s profile: the sim predicts every side")


def parse_rates(args: argparse.Namespace) -> list[float]:
    if args.rates:
        rates = sorted(float(r) for r in args.rates.split(",") if r.strip())
    elif args.rate is not None:
        rates = [args.rate]
    else:
        raise SystemExit("bench live needs --rate or --rates")
    if not rates or any(r <= 0 or not math.isfinite(r) for r in rates):
        raise SystemExit("rates must be positive")
    return rates


def parse_sides(text: str) -> list[str]:
    sides = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sides if s != ENGINE_SIDE and s not in POLICY_NAMES]
    if unknown or ENGINE_SIDE not in sides or len(sides) < 2:
        raise SystemExit(f"--policies: {ENGINE_SIDE} and at least one of "
                         f"{','.join(POLICY_NAMES)} (unknown: {unknown})")
    return sides


def build_trace(args: argparse.Namespace) -> Trace:
    params = scaled_params(args.token_scale, args.tool_scale)
    mix = parse_mix(args.mix) if args.workload == "mixed" else None
    if mix is not None and any(kind not in LIVE_PROGRAM_TYPES for kind, _ in mix):
        raise SystemExit(f"--mix: bench live runs {', '.join(LIVE_PROGRAM_TYPES)}")
    return generate_trace(args.workload, args.programs, args.seed, params, mix=mix)


# ---------------------------------------------------------------------- engines
class LiveEngine:
    """What serves a side: a fresh torch engine, or the engine server at `url`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.kind = args.engine
        self.url = args.engine_url
        if self.kind != "torch" and not self.url:
            raise SystemExit(f"--engine {self.kind} needs --engine-url")
        self.torch_config = self._torch_config() if self.kind == "torch" else None
        self.model_dir: str | None = None

    def _torch_config(self) -> Any:
        from engine_backend.torch.config import TorchConfig

        update: dict[str, Any] = {"model_path": self.args.model}
        if self.args.kv_tokens:
            update["kv_capacity_tokens"] = self.args.kv_tokens
        if self.args.max_running:
            update["max_running"] = self.args.max_running
        return TorchConfig(**update)

    async def new_torch(self) -> Any:
        from engine_backend.torch import TorchEngine

        engine = await asyncio.to_thread(TorchEngine.from_pretrained, self.args.model,
                                         self.torch_config)
        self.model_dir = str(engine.model_path)
        await engine.start()
        return engine

    def describe(self, counters: dict[str, float], model_dir: str) -> dict[str, Any]:
        if self.kind == "torch":
            cfg = self.torch_config
            return {"kind": "torch", "model": self.model_dir,
                    "kv_tokens": cfg.kv_capacity_tokens, "max_running": cfg.max_running,
                    "chunked_prefill_tokens": cfg.chunked_prefill_tokens}
        out: dict[str, Any] = {"kind": self.kind, "url": self.url,
                               "kv_tokens": counters.get("kv_tokens")}
        if self.args.kv_tokens:
            per_token = kv_bytes_per_token(model_dir)
            out["kv_hint"] = VLLM_KV_HINT.format(tokens=self.args.kv_tokens,
                                                 bytes=self.args.kv_tokens * per_token,
                                                 per_token=per_token)
        return out


def kv_bytes_per_token(model_dir: str) -> int:
    """K and V of every layer, fp32 (vLLM-CPU serves SmolLM2 with --dtype float32)."""
    from .calibrate import model_shape

    shape = model_shape(model_dir)
    return int(2 * shape.num_layers * shape.kv_heads * shape.head_dim * 4)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class InProcessProgserve:
    """`progserve serve` in this event loop, its shipped defaults with `policy`, in front
    of `engine` (torch) or of the engine server."""

    def __init__(self, live: LiveEngine, policy: str, engine: Any) -> None:
        from progserve.config import Settings

        settings: dict[str, Any] = {"engine": live.kind if live.kind != "torch" else "torch",
                                    "scheduler": SchedulerConfig(policy=policy)}
        if live.kind != "torch":
            settings["engine_url"] = [live.url]
        self.settings = Settings(**settings)
        self.engine = engine
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> InProcessProgserve:
        import uvicorn

        from progserve.app import create_app
        from progserve.runtime import ServerRuntime

        engines = [self.engine] if self.engine is not None else None
        app = create_app(ServerRuntime(self.settings, engines=engines))
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on", access_log=False)
        self.server = uvicorn.Server(config)
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("progserve did not start")
            await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        await self.task


# ------------------------------------------------------------------------ runs
async def replay(trace: Trace, rate: float, programs: LivePrograms,
                 call: Callable[..., Any]) -> list[ProgramRecord]:
    """Every program at its arrival (real time), its calls through `call`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    records: list[ProgramRecord] = []

    async def one(program: Any, arrival: float) -> None:
        record = ProgramRecord(program.index, program.kind, arrival)
        records.append(record)
        await programs.run(program, call, record)
        record.finish = time.perf_counter()

    tasks = []
    for program in trace.programs:
        delay = start + program.unit_arrival / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(program, time.perf_counter())))
    await asyncio.gather(*tasks)
    return sorted(records, key=lambda r: r.index)


async def replay_openai(trace: Trace, rate: float, programs: LivePrograms, url: str, *,
                        tagged: bool) -> list[ProgramRecord]:
    """`replay` through a server's chat completions (`tagged`: with progserve's program
    headers)."""
    caller = OpenAICaller(url, await served_model(url), tag_programs=tagged)
    try:
        return await replay(trace, rate, programs, caller)
    finally:
        await caller.aclose()


async def run_side(live: LiveEngine, side: str, trace: Trace, rate: float,
                   words: tuple[str, ...]) -> dict[str, Any]:
    programs = LivePrograms(trace.params, words)
    engine = await live.new_torch() if live.kind == "torch" else None
    wall = time.perf_counter()
    try:
        if live.kind != "torch":
            await reset_prefix_cache(live.url)
        before = await counters_of(live, engine)
        if side == ENGINE_SIDE:
            if engine is not None:
                records = await replay(trace, rate, programs, DirectEngineCaller(engine))
            else:
                records = await replay_openai(trace, rate, programs, live.url, tagged=False)
            after = await counters_of(live, engine)
        else:
            async with InProcessProgserve(live, side, engine) as server:
                records = await replay_openai(trace, rate, programs, server.url, tagged=True)
                after = await counters_of(live, engine)
    finally:
        if engine is not None:
            await engine.close()
    summary = summarize(records)
    summary["engine_counters"] = counter_delta(before, after)
    summary["wall_s"] = time.perf_counter() - wall
    summary["rate"] = rate
    return summary


async def counters_of(live: LiveEngine, engine: Any) -> dict[str, float]:
    if engine is not None:
        return await engine_counters(engine)
    return await vllm_counters(live.url)


async def reset_prefix_cache(url: str) -> bool:
    """vLLM answers this in dev mode (VLLM_SERVER_DEV_MODE=1); otherwise sides share a
    warm cache, which the JSON says."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=30.0) as client:
            resp = await client.post(server_root(url) + "/reset_prefix_cache")
        return resp.status_code == 200
    except httpx.HTTPError:
        return False


def summarize(records: list[ProgramRecord]) -> dict[str, Any]:
    calls = [c for r in records for c in r.calls]
    prompt = sum(c.prompt_tokens for c in calls)
    cached = sum(c.cached_tokens for c in calls)
    ttfts = sorted(c.ttft for c in calls if c.ttft is not None)
    out = latency_stats(r.token_latency for r in records)
    out.update({
        "programs": len(records), "calls": len(calls),
        "tokens": sum(r.tokens for r in records),
        "prompt_tokens": prompt, "cached_tokens": cached,
        "cache_hit_rate": cached / prompt if prompt else 0.0,
        "mean_ttft": sum(ttfts) / len(ttfts) if ttfts else None,
        "p95_ttft": percentile(ttfts, 95) if ttfts else None,
        "per_program": [
            {"index": r.index, "kind": r.kind, "response_s": r.finish - r.arrival,
             "tokens": r.tokens, "token_latency": r.token_latency,
             "calls": [{"ttft": c.ttft, "latency": c.end - c.start,
                        "prompt_tokens": c.prompt_tokens,
                        "completion_tokens": c.completion_tokens,
                        "cached_tokens": c.cached_tokens} for c in r.calls]}
            for r in records
        ],
    })
    return out


# ------------------------------------------------------------------------- sim
def sim_config(live: LiveEngine, hardware: HardwareProfile, seed: int,
               counters: dict[str, float]) -> SimConfig:
    """The sim engine with the real engine's limits."""
    update: dict[str, Any] = {"stream_interval": 0, "seed": seed, "hardware": hardware}
    if live.torch_config is not None:
        cfg = live.torch_config
        update.update(kv_capacity_tokens=cfg.kv_capacity_tokens, max_running=cfg.max_running,
                      chunked_prefill_tokens=cfg.chunked_prefill_tokens)
    elif counters.get("kv_tokens"):
        update["kv_capacity_tokens"] = int(counters["kv_tokens"])
    return SimConfig(**update)


def simulate(trace: Trace, side: str, rate: float, sim: SimConfig) -> dict[str, Any]:
    """The sim's prediction of one side: the same trace through the real scheduler and
    `SimEngine` in virtual time."""
    if side == ENGINE_SIDE:
        setup = BenchSetup(1, sim, SchedulerConfig(**SIM_ENGINE_ALONE))
        result = run_trace(trace, BASELINE_POLICY, rate, setup)
    else:
        setup = BenchSetup(1, sim, SchedulerConfig(policy=side))
        result = run_trace(trace, side, rate, setup)
    out = latency_stats(p.token_latency for p in result.programs)
    out["cache_hit_rate"] = result.engine["cache_hit_rate"]
    out["preemptions"] = result.engine["preemptions"]
    return out


def fidelity(runs: dict[str, Any], sim: dict[str, Any], best: str) -> dict[str, Any]:
    errors = {name: abs(sim[name]["mean_token_latency"] - run["mean_token_latency"])
              / run["mean_token_latency"] for name, run in runs.items() if name in sim}
    measured = runs[best]["mean_token_latency"] / runs[ENGINE_SIDE]["mean_token_latency"]
    predicted = sim[best]["mean_token_latency"] / sim[ENGINE_SIDE]["mean_token_latency"]
    return {"rel_error": errors,
            "mean_abs_rel_error": sum(errors.values()) / len(errors),
            "max_abs_rel_error": max(errors.values()),
            "measured_ratio": measured, "predicted_ratio": predicted,
            "ratio_error": abs(predicted - measured) / measured}


def comparison(runs: dict[str, Any]) -> dict[str, Any]:
    base = runs[ENGINE_SIDE]["mean_token_latency"]
    ratios = {name: run["mean_token_latency"] / base for name, run in runs.items()
              if name != ENGINE_SIDE}
    best = min(ratios, key=ratios.__getitem__)
    out = {"best": best, "mean_ratio": ratios[best], "ratios": ratios,
           "p95_ratio": runs[best]["p95_token_latency"] / runs[ENGINE_SIDE]["p95_token_latency"]}
    if DEFAULT_POLICY in ratios:
        out["default_policy"] = DEFAULT_POLICY
        out["default_mean_ratio"] = ratios[DEFAULT_POLICY]
    return out


def knee(sweep: list[dict[str, Any]], factor: float) -> float:
    floor = sweep[0]["mean_token_latency"]
    for point in sweep:
        if point["mean_token_latency"] >= factor * floor:
            return float(point["rate"])
    return float(sweep[-1]["rate"])


# ------------------------------------------------------------------------ main
async def bench(args: argparse.Namespace) -> dict[str, Any]:
    sides = parse_sides(args.policies)
    rates = parse_rates(args)
    trace = build_trace(args)
    live = LiveEngine(args)
    hardware = load_hardware_profile(args.hardware) if args.hardware else None
    tokenizer = args.tokenizer or args.model
    if tokenizer is None:
        from engine_backend.torch.smollm2 import ensure_smollm2

        tokenizer = str(await asyncio.to_thread(ensure_smollm2))
    words = await asyncio.to_thread(one_token_words, tokenizer)
    counters = await vllm_kv_tokens(live)
    report: dict[str, Any] = {
        "bench": "live", "workload": args.workload, "programs": args.programs,
        "seed": args.seed, "token_scale": args.token_scale, "tool_scale": args.tool_scale,
        "load": os.getloadavg(), "sides": sides,
    }
    sweep: list[dict[str, Any]] = []
    engine_runs: dict[float, dict[str, Any]] = {}
    if len(rates) > 1:
        for rate in rates:
            run = await run_side(live, ENGINE_SIDE, trace, rate, words)
            engine_runs[rate] = run
            point = {k: run[k] for k in ("rate", "mean_token_latency", "p95_token_latency",
                                         "cache_hit_rate", "mean_ttft")}
            sweep.append(point)
            print(f"engine alone @ {rate}/s: mean {run['mean_token_latency'] * 1e3:.1f} ms/token",
                  flush=True)
    rate = knee(sweep, args.knee_factor) if sweep else rates[0]
    runs: dict[str, Any] = {}
    for side in sides:
        if side == ENGINE_SIDE and rate in engine_runs:
            runs[side] = engine_runs[rate]
            continue
        runs[side] = await run_side(live, side, trace, rate, words)
        print(f"{side} @ {rate}/s: mean {runs[side]['mean_token_latency'] * 1e3:.1f} ms/token,"
              f" hit {runs[side]['cache_hit_rate']:.2f}", flush=True)
    report["engine"] = live.describe(counters, tokenizer)
    report["rate"] = rate
    report["load_after"] = os.getloadavg()
    if sweep:
        report["sweep"] = {"engine": sweep, "knee_rate": rate, "knee_factor": args.knee_factor}
    report["runs"] = runs
    report["comparison"] = comparison(runs)
    if hardware is not None:
        sim_cfg = sim_config(live, hardware, args.seed, counters)
        sim = {side: await asyncio.to_thread(simulate, trace, side, rate, sim_cfg)
               for side in sides}
        report["sim"] = sim
        report["sim_setup"] = {"hardware": str(args.hardware),
                               "kv_capacity_tokens": sim_cfg.kv_capacity_tokens,
                               "max_running": sim_cfg.max_running,
                               "chunked_prefill_tokens": sim_cfg.chunked_prefill_tokens}
        if sweep:
            for point in sweep:
                point["sim_mean_token_latency"] = (await asyncio.to_thread(
                    simulate, trace, ENGINE_SIDE, point["rate"], sim_cfg))["mean_token_latency"]
        report["fidelity"] = fidelity(runs, sim, report["comparison"]["best"])
    return report


async def vllm_kv_tokens(live: LiveEngine) -> dict[str, float]:
    """The KV tokens an engine server reports (vLLM's `cache_config_info`: blocks x block
    size), as {"kv_tokens": n}, or {}."""
    if live.kind == "torch":
        return {}
    import re

    import httpx

    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            text = (await client.get(server_root(live.url) + "/metrics")).text
    except httpx.HTTPError:
        return {}
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info"):
            blocks = re.search(r'num_gpu_blocks="(\d+)"', line)
            size = re.search(r'block_size="(\d+)"', line)
            if blocks and size:
                return {"kv_tokens": float(int(blocks.group(1)) * int(size.group(1)))}
    return {}


def print_table(report: dict[str, Any]) -> None:
    sim = report.get("sim", {})
    print(f"\nbench live: {report['engine']['kind']} @ {report['rate']} programs/s, "
          f"{report['programs']} {report['workload']} programs")
    print(f"{'side':<8} {'mean ms/tok':>12} {'p95':>8} {'hit':>6} {'ttft ms':>8} {'sim mean':>9}")
    for name, run in report["runs"].items():
        predicted = sim.get(name, {}).get("mean_token_latency")
        ttft = run.get("mean_ttft") or 0.0
        print(f"{name:<8} {run['mean_token_latency'] * 1e3:>12.1f} "
              f"{run['p95_token_latency'] * 1e3:>8.1f} {run['cache_hit_rate']:>6.2f} "
              f"{ttft * 1e3:>8.1f} "
              f"{(predicted * 1e3 if predicted else float('nan')):>9.1f}")
    comp = report["comparison"]
    print(f"best progserve / engine alone: {comp['mean_ratio']:.2f} ({comp['best']})")
    if "fidelity" in report:
        fid = report["fidelity"]
        print(f"sim: mean |rel error| {fid['mean_abs_rel_error']:.1%}, "
              f"ratio error {fid['ratio_error']:.1%}")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["runs"])
    measured = [report["runs"][n]["mean_token_latency"] * 1e3 for n in names]
    predicted = [report.get("sim", {}).get(n, {}).get("mean_token_latency", math.nan) * 1e3
                 for n in names]
    panels = 2 if "sweep" in report else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], measured, 0.4, label="measured")
    ax.bar([x + 0.2 for x in xs], predicted, 0.4, label="sim (calibrated)")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("mean program token latency (ms)")
    ax.set_title(f"{report['engine']['kind']}: {report['workload']} @ {report['rate']}/s")
    ax.legend()
    if panels == 2:
        ax = axes[0][1]
        sweep = report["sweep"]["engine"]
        ax.plot([p["rate"] for p in sweep], [p["mean_token_latency"] * 1e3 for p in sweep],
                "o-", label="engine alone, measured")
        if all("sim_mean_token_latency" in p for p in sweep):
            ax.plot([p["rate"] for p in sweep],
                    [p["sim_mean_token_latency"] * 1e3 for p in sweep], "s--",
                    label="engine alone, sim")
        ax.axvline(report["rate"], color="gray", linestyle=":", label="knee")
        ax.set_xlabel("programs/s")
        ax.set_ylabel("mean program token latency (ms)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    report = asyncio.run(bench(args))
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)
    return 0
