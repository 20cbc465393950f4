"""Shared plumbing of the runnable examples: flags, picking a runtime, printing results.

Every example takes the same flags:
    --url URL          run against a progserve server (remote runtime)
    --engine E         embedded engine when no --url: auto (torch + SmolLM2 when installed,
                       else sim), sim or torch
    --api-key KEY      for --url servers with API keys
    --time-scale X     sim engine speed in real time (0.1 runs 10x faster)
    --docs DIR         what the embedded `search_docs` tool searches (default: docs/)
    --json             print one JSON line (result, latency, tokens) instead of text
With the sim engine the example's scripted responder (pattern -> reply rules) writes the
model's text, so that its output drives the program's control flow sensibly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .program import ProgramResult
from .runtime import Runtime

if TYPE_CHECKING:  # the server's modules load only for an embedded runtime
    from progserve.config import Settings

# The checkout's docs/ (an editable install); the embedded `search_docs` tool searches it.
DEFAULT_DOCS = Path(__file__).resolve().parents[1] / "docs"
ScriptRule = dict[str, str]  # {"pattern": regex over the prompt, "reply": text}
ExampleMain = Callable[[Runtime, argparse.Namespace], Awaitable[ProgramResult[Any]]]


def example_parser(
    doc: str | None, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="progserve server URL (default: an embedded runtime)")
    parser.add_argument(
        "--engine", choices=["auto", "sim", "torch"], default="auto", help="embedded engine"
    )
    parser.add_argument("--api-key", help="API key of the --url server")
    parser.add_argument(
        "--time-scale", type=float, default=None, help="sim engine speed (0.1: 10x faster)"
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=DEFAULT_DOCS if DEFAULT_DOCS.is_dir() else None,
        help="embedded runtime: the directory `search_docs` searches (default: docs/)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument(
        "--print-script",
        action="store_true",
        help="print the sim engine's scripted rules (JSON) and exit; `progserve demo` uses it",
    )
    if add_arguments is not None:
        add_arguments(parser)
    return parser


def embedded_engine(choice: str) -> str:
    """`auto` means progserve's embedded default (torch + SmolLM2 when installed, else sim)."""
    from progserve.engines import embedded_default_engine

    return embedded_default_engine() if choice == "auto" else choice


def embedded_settings(
    engine: str, script: list[ScriptRule], workdir: Path, time_scale: float | None
) -> Settings:
    """progserve settings of an embedded runtime. The sim engine reads its scripted rules
    from a JSON file, written here into `workdir`."""
    from progserve.config import load_settings

    overrides: dict[str, Any] = {"engine": engine}
    if engine == "sim":
        script_file = workdir / "script.json"
        script_file.write_text(json.dumps(script))
        sim: dict[str, Any] = {"script_file": str(script_file)}
        if time_scale is not None:
            sim["time_scale"] = time_scale
        overrides["sim"] = sim
    elif engine == "torch":
        from engine_backend.torch.smollm2 import ensure_smollm2

        overrides["model"] = str(ensure_smollm2())
    return load_settings(**overrides)


@asynccontextmanager
async def open_runtime(
    args: argparse.Namespace, script: list[ScriptRule]
) -> AsyncIterator[Runtime]:
    """The runtime the flags ask for: remote with --url, else embedded."""
    if args.url:
        from .runtime_remote import RemoteRuntime

        async with RemoteRuntime(args.url, api_key=args.api_key) as remote:
            yield remote
        return
    from .runtime_local import LocalRuntime

    with tempfile.TemporaryDirectory(prefix="progserve-example-") as workdir:
        settings = await asyncio.to_thread(  # the torch engine may convert its model first
            embedded_settings, embedded_engine(args.engine), script, Path(workdir), args.time_scale
        )
        async with LocalRuntime(settings, docs_root=args.docs) as local:
            yield local


def report(result: ProgramResult[Any], *, as_json: bool) -> None:
    """Print a program's result with its latency and token counts (text or one JSON line)."""
    print_report(
        value=result.value,
        program_id=result.program_id,
        latency_s=result.latency_s,
        calls=result.calls,
        prompt_tokens=result.prompt_tokens,
        cached_tokens=result.cached_tokens,
        completion_tokens=result.completion_tokens,
        check=result.check,
        as_json=as_json,
    )


def print_report(
    *,
    value: Any,
    program_id: str,
    latency_s: float,
    calls: int | None,
    prompt_tokens: int,
    cached_tokens: int,
    completion_tokens: int,
    as_json: bool,
    check: dict[str, Any] | None = None,
) -> None:
    fields = {
        "result": value,
        "answer": value.get("answer", value) if isinstance(value, dict) else value,
        "check": check,
        "program_id": program_id,
        "latency_s": latency_s,
        "calls": calls,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "completion_tokens": completion_tokens,
    }
    if as_json:
        print(json.dumps(fields, default=str))
        return
    text = value if isinstance(value, str) else json.dumps(value, indent=2, default=str)
    print(f"result:\n{text}\n")
    print(f"program: {program_id}" + (f" ({calls} calls)" if calls is not None else ""))
    print(f"latency: {latency_s:.3f} s")
    print(f"cached tokens: {cached_tokens} of {prompt_tokens} prompt tokens")
    print(f"completion tokens: {completion_tokens}")
    if check is not None:
        verdict = "passed" if check["passed"] else f"FAILED ({check.get('why', '')})"
        print(f"check: {verdict}; expected {check['expected']}")


def run_example(
    main: ExampleMain,
    *,
    script: list[ScriptRule],
    doc: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
) -> int:
    """Parse the flags, open the runtime, run `main`, print its result. Exit status 0."""
    args = example_parser(doc, add_arguments).parse_args(argv)
    if args.print_script:
        print(json.dumps(script))
        return 0

    async def go() -> ProgramResult[Any]:
        async with open_runtime(args, script) as runtime:
            return await main(runtime, args)

    report(asyncio.run(go()), as_json=args.json)
    return 0


# -- an in-process progserve server, for examples that use other clients -------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_in_background(args: argparse.Namespace, script: list[ScriptRule]) -> Iterator[str]:
    """The URL of a progserve server: `--url` if given, else one started in a background
    thread of this process on a free loopback port (stopped on exit)."""
    if args.url:
        yield args.url.rstrip("/")
        return
    import uvicorn

    from progserve.app import create_app

    with tempfile.TemporaryDirectory(prefix="progserve-example-") as workdir:
        settings = embedded_settings(
            embedded_engine(args.engine), script, Path(workdir), args.time_scale
        )
        port = free_port()
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=port, log_level="warning"
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="progserve", daemon=True)
        thread.start()
        try:
            _wait_started(server, thread)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=30)


def _wait_started(server: Any, thread: threading.Thread, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s  # a torch engine loads its model first
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the in-process progserve server failed to start")
        if time.monotonic() > deadline:
            raise TimeoutError("the in-process progserve server did not start in time")
        time.sleep(0.05)


def fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 1
