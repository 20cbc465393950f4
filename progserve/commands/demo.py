"""Run the example agent programs on the embedded default engine and show what progserve did.

`progserve demo` starts a progserve server in this process (the torch engine with the
embedded SmolLM2 when installed, else the simulated engine), runs several example programs
from `examples/` against it at the same time, each as its own client process, and prints
every program's latency and cached-token counts, its answer and whether the answer is
right (each example checks its own: an exact value where there is one, else rules that
junk fails), plus where the tracing UI is. `--json OUT` writes the same per example
(`name`, `answer`, `check`: `passed`, `expected`). The exit status is 0 only when every
example ran and every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from progserve.config import Settings, load_settings
from progserve.engines import embedded_default_engine

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"


@dataclass(frozen=True, slots=True)
class DemoProgram:
    example: str  # file name in examples/, without .py
    # Sizes that keep a CPU run of the real model within a few minutes; None: too long
    # for the real model on a CPU, so the torch demo skips it.
    torch_args: tuple[str, ...] | None = ()


PROGRAMS = (
    DemoProgram("react_agent", torch_args=("--max-steps", "3")),
    DemoProgram("map_reduce_summary", torch_args=("--chunks", "4")),
    DemoProgram("tree_search", torch_args=("--width", "4", "--depth", "2")),
    DemoProgram("multi_agent_debate", torch_args=("--agents", "2", "--rounds", "1")),
    DemoProgram("llm_compiler"),
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=["auto", "sim", "torch"],
        default="auto",
        help="auto: torch + SmolLM2 when installed, else sim",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument(
        "--examples",
        default=",".join(p.example for p in PROGRAMS),
        help="comma-separated example names to run",
    )
    parser.add_argument(
        "--keep-serving", action="store_true", help="keep the server (and its UI) up afterwards"
    )
    parser.add_argument("--policy", default=None, help="scheduling policy (default: config)")
    parser.add_argument(
        "--no-prefix-cache", action="store_true", help="torch engine: never reuse prefix KV"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds allowed per example program"
    )
    parser.add_argument(
        "--json", type=Path, metavar="OUT", dest="json_out",
        help="write each example's name, answer and check (and its numbers) to OUT",
    )


def main(args: argparse.Namespace) -> int:
    if not EXAMPLES_DIR.is_dir():
        print(f"progserve demo runs the programs in {EXAMPLES_DIR}: use a source checkout")
        return 2
    engine = embedded_default_engine() if args.engine == "auto" else args.engine
    chosen = _chosen_programs(args.examples, engine)
    return asyncio.run(_demo(args, engine, chosen))


def _chosen_programs(names: str, engine: str) -> list[DemoProgram]:
    by_name = {p.example: p for p in PROGRAMS}
    chosen = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in by_name and not (EXAMPLES_DIR / f"{name}.py").is_file():
            raise SystemExit(f"unknown example {name!r}; choose from {', '.join(by_name)}")
        program = by_name.get(name, DemoProgram(name))
        if engine != "torch" or program.torch_args is not None:
            chosen.append(program)
    return chosen


async def _demo(args: argparse.Namespace, engine: str, programs: list[DemoProgram]) -> int:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="progserve-demo-") as workdir:
        with console.status(f"starting progserve on the {engine} engine..."):
            settings = await _settings(args, engine, programs, Path(workdir))
            server, serving = await _start_server(settings)
        url = f"http://{settings.host}:{server.servers[0].sockets[0].getsockname()[1]}"
        console.print(f"progserve is serving on [bold]{url}[/] (engine: {engine})")
        try:
            results = await _run_programs(console, url, programs, engine, args.timeout)
            _print_results(console, results)
            if args.json_out is not None:
                _write_json(args.json_out, engine, results)
            console.print(f"\nTracing UI: [bold]{url}/ui[/]  (program DAGs and timelines)")
            if args.keep_serving:
                console.print("Serving until Ctrl-C.")
                await serving
            elif sys.stdout.isatty():
                console.print("Run with --keep-serving to browse it.")
        finally:
            server.should_exit = True
            await serving
    return 0 if all(r["ok"] and _passed(r) for r in results) else 1


def _passed(result: dict[str, Any]) -> bool:
    return bool((result.get("check") or {}).get("passed"))


def _write_json(path: Path, engine: str, results: list[dict[str, Any]]) -> None:
    examples = []
    for r in results:
        entry: dict[str, Any] = {
            "name": r["example"],
            "answer": r.get("answer"),
            "check": r.get("check") or {"passed": False, "expected": "the example to run",
                                         "why": r.get("error", "it reported no check")},
        }
        if r["ok"]:
            entry.update({key: r[key] for key in ("program_id", "latency_s", "calls",
                                                   "prompt_tokens", "cached_tokens",
                                                   "completion_tokens")})
        else:
            entry["error"] = r["error"]
        examples.append(entry)
    path.write_text(json.dumps({"engine": engine, "passed": all(_passed(r) for r in results),
                                "examples": examples}, indent=2, default=str))


async def _settings(
    args: argparse.Namespace, engine: str, programs: list[DemoProgram], workdir: Path
) -> Settings:
    overrides: dict[str, Any] = {
        "engine": engine,
        "host": args.host,
        "port": args.port,
        "tools": {"docs_root": str(EXAMPLES_DIR.parent / "docs")},  # the examples search it
    }
    if args.policy:
        overrides["scheduler"] = {"policy": args.policy}
    if args.no_prefix_cache:
        overrides["torch"] = {"prefix_cache": False}
    if engine == "sim":
        # The sim engine writes the replies the examples script, so that their control
        # flow (ReAct actions, plans, votes) runs as with a real model.
        script_file = workdir / "script.json"
        script_file.write_text(json.dumps(await _collect_scripts(programs)))
        overrides["sim"] = {"script_file": str(script_file)}
    return await asyncio.to_thread(load_settings, **overrides)


async def _collect_scripts(programs: list[DemoProgram]) -> list[dict[str, str]]:
    outputs = await asyncio.gather(
        *(_run_example(p.example, ["--print-script"], timeout=120) for p in programs)
    )
    rules: list[dict[str, str]] = []
    for program, (code, out, err) in zip(programs, outputs, strict=True):
        if code != 0:
            raise SystemExit(f"examples/{program.example}.py --print-script failed:\n{err}")
        rules += json.loads(out)
    return rules


async def _start_server(settings: Settings) -> tuple[Any, asyncio.Task[None]]:
    import uvicorn

    from progserve.app import create_app

    # A torch engine loads its model while the app is built: keep the loop responsive.
    app = await asyncio.to_thread(create_app, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()  # raises the start-up error
            raise RuntimeError("progserve stopped during start-up")
        await asyncio.sleep(0.05)
    return server, serving


async def _run_programs(
    console: Console, url: str, programs: list[DemoProgram], engine: str, timeout: float
) -> list[dict[str, Any]]:
    started = time.perf_counter()
    with console.status(f"running {len(programs)} programs at once against {url}..."):
        outcomes = await asyncio.gather(
            *(
                _run_example(
                    p.example,
                    ["--url", url, "--json", *((p.torch_args or ()) if engine == "torch" else ())],
                    timeout=timeout,
                )
                for p in programs
            )
        )
    console.print(f"all programs done in {time.perf_counter() - started:.1f} s")
    return [_parse_outcome(p.example, *o) for p, o in zip(programs, outcomes, strict=True)]


async def _run_example(name: str, argv: list[str], *, timeout: float) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES_DIR / f"{name}.py"),
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 124, "", f"timed out after {timeout:.0f} s"
    return proc.returncode or 0, out.decode(), err.decode()


def _parse_outcome(name: str, code: int, out: str, err: str) -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        last = (err.strip().splitlines() or ["no output"])[-1]
        return {"example": name, "ok": False, "error": f"exit {code}: {last}"}
    return {"example": name, "ok": True, **json.loads(lines[-1])}


def _print_results(console: Console, results: list[dict[str, Any]]) -> None:
    table = Table(title="programs")
    columns = ("example", "program", "calls", "latency s", "cached / prompt tokens", "out",
               "check")
    for column in columns:
        table.add_column(column, justify="left" if column in ("example", "program") else "right")
    for r in results:
        if not r["ok"]:
            table.add_row(r["example"], f"[red]{r['error']}[/]", "", "", "", "", "[red]-[/]")
            continue
        table.add_row(
            r["example"],
            r["program_id"],
            str(r.get("calls") or "-"),
            f"{r['latency_s']:.2f}",
            f"{r['cached_tokens']} / {r['prompt_tokens']}",
            str(r["completion_tokens"]),
            "[green]passed[/]" if _passed(r) else "[red]FAILED[/]",
        )
    console.print(table)
    for r in results:
        if r["ok"]:
            answer = r.get("answer", r["result"])
            text = answer if isinstance(answer, str) else json.dumps(answer)
            console.print(f"[bold]{r['example']}[/]: {text[:160]}")
            check = r.get("check") or {"expected": "a check", "why": "none reported"}
            verdict = "passed" if _passed(r) else f"[red]FAILED[/] ({check.get('why', '')})"
            console.print(f"  check {verdict}: expected {check['expected']}")
