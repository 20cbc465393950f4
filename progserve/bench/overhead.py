"""Middleware overhead: the latency progserve adds per call over calling the engine directly.

One run starts, on loopback:
- an *engine server*: by default (`--upstream fake`) a fake engine that answers from a
  table of canned replies (`progserve/bench/fake_engine.py`: many times faster than a
  proxy, so the proxy's requests/s are its own ceiling); `--upstream sim` runs
  `progserve serve --engine sim` in real time with a tiny time scale and one chunk per
  reply instead (a progserve process itself);
- progserve in front of it as a proxy, with API keys on: `--engine sglang --engine-url
  <engine>` (and `--engine openai` for the chat scenario); `--processes N` runs N
  `--engine openai` processes sharing state in a redis-server (`--redis-url`), each on
  its own port with its share of the connections (one wrk per process, as a load
  balancer spreads them): the scale-out of one host;
- LiteLLM's proxy in front of the same engine, when it is installed (`--litellm`).

wrk (`--connections`, one by default; one thread; keep-alive) then sends the same
non-streamed request to the engine directly and through each proxy, in the same run, in
`--rounds` alternating rounds (direct, proxy A, proxy B, direct, ...): a machine whose
speed drifts during the run (other jobs, frequency) shifts both sides of a round alike.
The added latency of a round is the difference of its percentiles (proxy minus the direct
run just before); the report gives the median over rounds, each target's percentiles as
medians over rounds, and every round in the JSON. `requests_per_s` (per target, and per
scenario for every target side by side) is wrk's rate; `added_p50_ms` the added p50.
Installs Debian's `wrk` if it is missing and the process may use apt.

    progserve bench overhead --duration 10 --json artifacts/overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..auth import hash_key
from .server_process import ServerProcess as Server
from .server_process import free_port, progserve_process

LITELLM_VENV = Path("/tmp/progserve-litellm-venv")
# Every target gets this bearer: progserve's keys file maps it to a tenant (API keys on, as
# a deployment runs), LiteLLM's proxy refuses to start without a master key, and the
# engine ignores it.
BENCH_KEY = "sk-" + secrets.token_hex(24)
DEFAULT_LITELLM = LITELLM_VENV / "bin" / "litellm"

_LUA = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH requests=%d duration_us=%d errors=%d ",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout))
  for _, p in ipairs({{50, 90, 99, 99.9}}) do
    io.write(string.format("p%s=%d ", p, latency:percentile(p)))
  end
  io.write(string.format("mean=%.1f min=%d max=%d\\n", latency.mean, latency.min, latency.max))
end
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds per target, split over the rounds")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds over the targets (>= 1)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds per target, unused")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per reply")
    parser.add_argument("--time-scale", type=float, default=1e-4,
                        help="sim real-time compression (tiny: a fast engine)")
    parser.add_argument("--scenarios", default="generate,chat",
                        help="comma list: generate (SGLang /generate), chat (OpenAI chat)")
    parser.add_argument("--litellm", default="auto",
                        help=f"LiteLLM proxy binary, 'auto' ({DEFAULT_LITELLM} or PATH), 'off'")
    parser.add_argument("--install-litellm", action="store_true",
                        help=f"pip install litellm[proxy] into {LITELLM_VENV} first (minutes)")
    parser.add_argument("--target-ms", type=float, default=1.0,
                        help="the most progserve may add at p50, in every scenario (ms)")
    parser.add_argument("--connections", type=int, default=1,
                        help="wrk's concurrent keep-alive connections per target")
    parser.add_argument("--upstream", choices=("fake", "sim"), default="fake",
                        help="engine server: canned answers (fake) or progserve's sim engine")
    parser.add_argument("--processes", type=int, default=1,
                        help="progserve --engine openai processes for the chat scenario, each "
                        "on its own port with its share of the connections (>1: state shared "
                        "in a redis-server)")
    parser.add_argument("--redis", action="store_true",
                        help="share state in a redis-server even with one process")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results here")


# ------------------------------------------------------------------------------ processes


def _progserve(name: str, flags: list[str], workdir: Path, env: dict[str, str]) -> Server:
    # The chat scenario names its model "bench" on every target (LiteLLM maps the name).
    # No start-up engine probe (the harness's default): its requests would land in the
    # measurement.
    return progserve_process("--log-level", "warning", *flags, name=name,
                             env={"PROGSERVE_MODEL_ALIASES": '["bench"]', **env},
                             log=workdir / f"{name}.log").start(120.0)


def _litellm(binary: str, engine: Server, model: str, workdir: Path) -> Server:
    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: bench\n"
        "    litellm_params:\n"
        f"      model: openai/{model}\n"
        f"      api_base: {engine.url}/v1\n"
        "      api_key: sk-bench\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {BENCH_KEY}\n"
    )
    argv = [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1"]
    return Server(argv, port=port, env={"LITELLM_LOG": "ERROR"}, name="litellm",
                  log=workdir / "litellm.log", health_path="/health/liveliness").start(240.0)


def find_litellm(choice: str) -> str | None:
    if choice == "off":
        return None
    if choice != "auto":
        return choice if Path(choice).exists() else None
    if DEFAULT_LITELLM.exists():
        return str(DEFAULT_LITELLM)
    return shutil.which("litellm")


def install_litellm() -> None:
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
                   check=True)


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        if subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], **quiet).returncode:
            subprocess.run(["apt-get", "update", "-q"], **quiet)
            subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], **quiet)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is needed: apt-get install -y wrk")
    return found


# ------------------------------------------------------------------------------ wrk


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class WrkResult:
    target: str
    url: str
    requests: int
    seconds: float
    errors: int
    rps: float
    p50_us: int
    p90_us: int
    p99_us: int
    p999_us: int
    mean_us: float
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)


def run_wrk(wrk: str, target: str, urls: str | list[str], body: dict[str, Any],
            duration: float, workdir: Path, servers: list[Server] = (),
            connections: int = 1) -> WrkResult:
    """One wrk run (one wrk process per URL, `connections` spread over them, all at once);
    also the CPU each server process spent per request meanwhile (robust where latency is
    not: on a machine shared with other work)."""
    urls = [urls] if isinstance(urls, str) else urls
    script = workdir / f"{target.replace(':', '-')}.lua"
    script.write_text(_LUA.format(body=json.dumps(body), key=BENCH_KEY))
    cpu_before = {s.name: cpu_seconds(s.proc.pid) for s in servers}
    share = [connections // len(urls) + (i < connections % len(urls)) for i in range(len(urls))]
    procs = [subprocess.Popen([wrk, "-t1", f"-c{max(1, n)}", f"-d{max(1, round(duration))}s",
                               "--timeout", "10s", "-s", str(script), url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for url, n in zip(urls, share, strict=True)]
    parts = [_wrk_values(target, *proc.communicate()) for proc in procs]
    requests = sum(int(v["requests"]) for v in parts)
    seconds = max(int(v["duration_us"]) for v in parts) / 1e6
    cpu = {s.name: round((cpu_seconds(s.proc.pid) - cpu_before[s.name]) * 1e3
                         / max(1, requests), 3) for s in servers}
    # Several wrk processes: their rates add up; a percentile is their request-weighted mean.
    weight = [int(v["requests"]) / max(1, requests) for v in parts]

    def mean(key: str) -> float:
        return sum(w * float(v[key]) for w, v in zip(weight, parts, strict=True))

    return WrkResult(
        target=target, url=urls[0] if len(urls) == 1 else ",".join(urls), requests=requests,
        seconds=seconds, errors=sum(int(v["errors"]) for v in parts),
        rps=sum(int(v["requests"]) / (int(v["duration_us"]) / 1e6) for v in parts
                if int(v["duration_us"])),
        p50_us=int(mean("p50")), p90_us=int(mean("p90")), p99_us=int(mean("p99")),
        p999_us=int(mean("p99.9")), mean_us=mean("mean"), cpu_ms_per_request=cpu,
    )


def _wrk_values(target: str, stdout: str, stderr: str) -> dict[str, str]:
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result for {target}:\n{stdout}\n{stderr}")
    return dict(item.split("=", 1) for item in line.split()[1:])


def check_answer(url: str, body: dict[str, Any]) -> None:
    """One request by hand first: wrk counts any 2xx, so make sure it is a real answer."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {BENCH_KEY}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer = json.loads(resp.read())
    if not (answer.get("text") is not None or answer.get("choices")):
        raise RuntimeError(f"{url} answered {answer!r}")


# ------------------------------------------------------------------------------ the run


@dataclass
class Scenario:
    name: str
    path: str
    body: dict[str, Any]
    # target name ("direct", "progserve(sglang)", ...) -> one wrk result per round
    rounds: dict[str, list[WrkResult]] = field(default_factory=dict)

    def record(self, name: str, result: WrkResult) -> None:
        self.rounds.setdefault(name, []).append(result)

    def added(self, name: str) -> dict[str, float]:
        """Median over rounds of (proxy - the direct run of the same round)."""
        pairs = list(zip(self.rounds[name], self.rounds["direct"], strict=True))
        return {
            f"{key}_added_ms": statistics.median(
                (getattr(p, f"{key}_us") - getattr(d, f"{key}_us")) / 1000 for p, d in pairs)
            for key in ("p50", "p99", "mean")
        }


def merge_rounds(results: list[WrkResult]) -> WrkResult:
    """One target's rounds as one result: counts summed, percentiles as medians over the
    rounds, mean and CPU per request weighted by requests."""
    requests = sum(r.requests for r in results)
    seconds = sum(r.seconds for r in results)
    weight = [r.requests / max(1, requests) for r in results]
    return WrkResult(
        target=results[0].target, url=results[0].url, requests=requests, seconds=seconds,
        errors=sum(r.errors for r in results), rps=requests / seconds if seconds else 0.0,
        p50_us=int(statistics.median(r.p50_us for r in results)),
        p90_us=int(statistics.median(r.p90_us for r in results)),
        p99_us=int(statistics.median(r.p99_us for r in results)),
        p999_us=int(statistics.median(r.p999_us for r in results)),
        mean_us=sum(w * r.mean_us for w, r in zip(weight, results, strict=True)),
        cpu_ms_per_request={
            key: round(sum(w * r.cpu_ms_per_request.get(key, 0.0)
                           for w, r in zip(weight, results, strict=True)), 3)
            for key in results[0].cpu_ms_per_request},
    )


def bodies(max_tokens: int) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "generate": ("/generate", {"text": "The quick brown fox jumps over the lazy dog.",
                                   "sampling_params": {"max_new_tokens": max_tokens,
                                                       "ignore_eos": True}}),
        "chat": ("/v1/chat/completions", {
            "model": "bench", "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": "The quick brown fox jumps over."}]}),
    }


def _engine(args: argparse.Namespace, workdir: Path) -> Server:
    if args.upstream == "fake":
        port = free_port()
        return Server([sys.executable, "-m", "progserve.bench.fake_engine", "--port", str(port)],
                      port=port, name="engine", log=workdir / "engine.log").start(120.0)
    return _progserve("engine", ["--engine", "sim"], workdir, {
        "PROGSERVE_SIM__TIME_SCALE": str(args.time_scale),
        "PROGSERVE_SIM__STREAM_INTERVAL": "0"})


def _redis(workdir: Path) -> Server:
    binary = shutil.which("redis-server") or str(Path(sys.executable).parent / "redis-server")
    if not Path(binary).exists():
        raise SystemExit("--processes > 1 needs a redis-server (bash scripts/ensure_redis.sh)")
    port = free_port()
    server = Server([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no"], port=port, name="redis",
                    log=workdir / "redis.log").launch()
    deadline = time.monotonic() + 30  # redis speaks its own protocol: wait for the port
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"redis-server did not come up:\n{server.output()[-2000:]}")


def _write_keys(workdir: Path) -> Path:
    """progserve runs with API keys on: the bench's bearer belongs to tenant `bench`."""
    keys = workdir / "api-keys.json"
    keys.write_text(json.dumps({hash_key(BENCH_KEY): "bench"}))
    return keys


def run(args: argparse.Namespace) -> dict[str, Any]:
    wrk = ensure_wrk()
    load_before = os.getloadavg()
    if args.install_litellm and not DEFAULT_LITELLM.exists():
        install_litellm()
    litellm_bin = find_litellm(args.litellm)
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    scenarios = [Scenario(name, *bodies(args.max_tokens)[name]) for name in wanted]
    servers: list[Server] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="progserve-overhead-") as tmp:
        workdir = Path(tmp)
        try:
            engine = _engine(args, workdir)
            servers.append(engine)
            keys = ["--api-keys", str(_write_keys(workdir))]
            # target name -> the servers that take its requests (several: one wrk each)
            proxies: dict[str, list[Server]] = {"progserve(sglang)": [_progserve(
                "progserve-sglang", ["--engine", "sglang", "--engine-url", engine.url, *keys],
                workdir, {})]}
            servers.extend(proxies["progserve(sglang)"])
            if "chat" in wanted:
                shared: list[str] = []
                if args.processes > 1 or args.redis:
                    redis = _redis(workdir)
                    servers.append(redis)
                    shared = ["--redis-url", f"redis://127.0.0.1:{redis.port}"]
                proxies["progserve(openai)"] = [_progserve(
                    f"progserve-openai{'' if args.processes == 1 else f'-{i}'}",
                    ["--engine", "openai", "--engine-url", engine.url, *keys, *shared],
                    workdir, {}) for i in range(max(1, args.processes))]
                servers.extend(proxies["progserve(openai)"])
                if litellm_bin:
                    try:
                        model = json.loads(urllib.request.urlopen(
                            engine.url + "/v1/models").read())["data"][0]["id"]
                        proxies["litellm"] = [_litellm(litellm_bin, engine, model, workdir)]
                        servers.extend(proxies["litellm"])
                    except (RuntimeError, OSError) as exc:
                        notes.append(f"litellm did not start: {str(exc)[:300]}")
                elif args.litellm == "off":
                    notes.append("litellm comparison turned off (--litellm off)")
                else:
                    notes.append("litellm not installed (--install-litellm): no comparison")
            measured = [s for s in servers if s.name != "redis"]
            rounds = max(1, args.rounds)
            for scenario in scenarios:
                targets = [("direct", [engine])] + [
                    (name, group) for name, group in proxies.items()
                    if scenario.name == "chat" or name == "progserve(sglang)"]
                for _, group in targets:
                    urls = [srv.url + scenario.path for srv in group]
                    for url in urls:
                        check_answer(url, scenario.body)
                    run_wrk(wrk, f"warmup-{scenario.name}", urls, scenario.body, args.warmup,
                            workdir, connections=args.connections)
                for _ in range(rounds):
                    for name, group in targets:
                        scenario.record(name, run_wrk(
                            wrk, f"{scenario.name}:{name}",
                            [srv.url + scenario.path for srv in group], scenario.body,
                            args.duration / rounds, workdir, measured, args.connections))
        finally:
            for server in reversed(servers):
                server.stop()
    return _report(args, scenarios, notes, load_before)


def _report(args: argparse.Namespace, scenarios: list[Scenario], notes: list[str],
            load_before: tuple[float, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {
        "config": {"duration_s": args.duration, "rounds": max(1, args.rounds),
                   "max_tokens": args.max_tokens,
                   "time_scale": args.time_scale, "connections": args.connections,
                   "upstream": args.upstream, "openai_processes": max(1, args.processes),
                   "redis": args.processes > 1 or args.redis,
                   "api_keys": True, "tool": "wrk", "cpus": os.cpu_count(),
                   "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "scenarios": {},
        "notes": notes,
    }
    for scenario in scenarios:
        direct = asdict(merge_rounds(scenario.rounds["direct"]))
        direct["requests_per_s"] = direct["rps"]
        entry: dict[str, Any] = {
            "direct": direct, "proxies": {},
            "rounds": {name: [asdict(r) for r in results]
                       for name, results in scenario.rounds.items()},
        }
        for proxy, results in scenario.rounds.items():
            if proxy != "direct":
                merged = asdict(merge_rounds(results))
                added = scenario.added(proxy)
                entry["proxies"][proxy] = {**merged, **added, "requests_per_s": merged["rps"],
                                           "added_p50_ms": added["p50_added_ms"]}
        # Both sides of the same run: every target's wrk rate (requests over its rounds).
        entry["requests_per_s"] = {"direct": direct["rps"], **{
            proxy: r["rps"] for proxy, r in entry["proxies"].items()}}
        ours = entry["proxies"].get("progserve(openai)") or entry["proxies"].get(
            "progserve(sglang)")
        theirs = entry["proxies"].get("litellm")
        if ours and theirs and ours["p50_added_ms"] > 0:
            entry["litellm_over_progserve_p50_added"] = \
                theirs["p50_added_ms"] / ours["p50_added_ms"]
        out["scenarios"][scenario.name] = entry
    out["target"] = _target(out["scenarios"], args.target_ms)
    return out


def _target(scenarios: dict[str, Any], limit_ms: float) -> dict[str, Any]:
    """Whether every progserve path stayed within `limit_ms` added at p50."""
    added = {f"{name}:{proxy}": r["p50_added_ms"] for name, entry in scenarios.items()
             for proxy, r in entry["proxies"].items() if proxy.startswith("progserve")}
    worst = max(added.values(), default=None)
    return {"p50_added_ms_max": limit_ms, "worst_p50_added_ms": worst, "added_p50_ms": worst,
            "worst_path": max(added, key=added.__getitem__) if added else None,
            "met": worst is not None and worst <= limit_ms}


def print_report(report: dict[str, Any]) -> None:
    cfg = report["config"]
    conns = cfg["connections"]
    print(f"middleware overhead: wrk, {conns} connection{'s' if conns > 1 else ''}, "
          f"{cfg['upstream']} engine, API keys on, "
          f"{cfg['openai_processes']} progserve(openai) process(es), "
          f"{cfg['duration_s']:.0f}s per target in "
          f"{cfg['rounds']} alternating rounds, {cfg['max_tokens']} tokens per reply "
          "(added: median over rounds of proxy minus direct)")
    header = f"{'scenario':9} {'target':18} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} " \
             f"{'+p50 ms':>8} {'+p99 ms':>8} {'errors':>6}  cpu ms/request (proxy, engine)"
    print(header)
    for name, entry in report["scenarios"].items():
        d = entry["direct"]
        print(f"{name:9} {'direct':18} {d['rps']:8.0f} {d['p50_us'] / 1e3:8.3f} "
              f"{d['p99_us'] / 1e3:8.3f} {'':>8} {'':>8} {d['errors']:6d}  "
              f"-, {d['cpu_ms_per_request'].get('engine', 0):.3f}")
        for proxy, r in entry["proxies"].items():
            cpu = r["cpu_ms_per_request"]
            own = sum(v for k, v in cpu.items() if k != "engine")
            print(f"{name:9} {proxy:18} {r['rps']:8.0f} {r['p50_us'] / 1e3:8.3f} "
                  f"{r['p99_us'] / 1e3:8.3f} {r['p50_added_ms']:8.3f} {r['p99_added_ms']:8.3f} "
                  f"{r['errors']:6d}  {own:.3f}, {cpu.get('engine', 0):.3f}")
        if "litellm_over_progserve_p50_added" in entry:
            print(f"{name:9} litellm adds {entry['litellm_over_progserve_p50_added']:.1f}x "
                  "progserve's p50 overhead")
    target = report["target"]
    if target["worst_p50_added_ms"] is not None:
        verdict = "met" if target["met"] else "NOT met"
        print(f"target: progserve adds at most {target['p50_added_ms_max']:g} ms at p50: "
              f"{verdict} (worst {target['worst_p50_added_ms']:.3f} ms, "
              f"{target['worst_path']})")
    for note in report["notes"]:
        print("note:", note)


def main(args: argparse.Namespace) -> int:
    report = run(args)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    failed = any(r["errors"] for s in report["scenarios"].values()
                 for r in [s["direct"], *s["proxies"].values()])
    return 1 if failed else 0
