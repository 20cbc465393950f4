"""Torch engine: time to first token with a cached shared prefix vs cold, on a real model.

Every repeat first flushes the prefix cache and sends `prefix + question_a` (cold: the
whole prompt is prefilled), then `prefix + question_b` with a question it has not seen
(cached: only the question is prefilled, the prefix KV comes from the radix tree). Cold
and cached requests alternate in the same run, so machine load affects both alike. Then
decode throughput at batch 1 and at `--batch`. The model defaults to the embedded
SmolLM2-135M-Instruct (converted on first use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TOOLS = ["search", "calculator", "code_runner", "weather", "calendar", "email", "files", "sql"]


@dataclass(slots=True)
class EngineBenchResult:
    model: str
    threads: int
    prefix_tokens: int
    prompt_tokens: int
    repeats: int
    ttft_cold_s: list[float]
    ttft_cached_s: list[float]
    cached_tokens: list[int]
    ttft_cold_median_s: float
    ttft_cached_median_s: float
    speedup: float  # median cold TTFT / median cached TTFT
    prefill_tok_s: float  # cold prompt tokens / median cold TTFT
    decode_tok_s: dict[str, float] = field(default_factory=dict)  # batch size -> tokens/s


def system_prompt(tokenizer: Any, tokens: int) -> list[int]:
    """A deterministic agent system prompt (tool manuals) cut to exactly `tokens` tokens."""
    lines = ["You are an agent. You solve tasks step by step and call tools when useful."]
    ids: list[int] = []
    section = 0
    while len(ids) < tokens:
        tool = TOOLS[section % len(TOOLS)]
        lines.append(
            f"Tool {section}: `{tool}`. Call it with a JSON object. It returns a result "
            f"that you must quote exactly; if it fails, explain the error ({section * 7 % 13})."
        )
        section += 1
        ids = tokenizer("\n".join(lines)).input_ids
    return ids[:tokens]


def question(tokenizer: Any, index: int) -> list[int]:
    text = f"\nUser: task number {index}: which tool answers question {index * 31 % 97}?\n"
    return tokenizer(text).input_ids


async def _ttft(engine: Any, rid: str, ids: list[int]) -> tuple[float, Any]:
    from engine_backend.types import GenerateRequest, SamplingParams

    request = GenerateRequest(
        rid=rid, input_ids=ids, sampling=SamplingParams(max_new_tokens=1, temperature=0)
    )
    loop = asyncio.get_running_loop()
    start = loop.time()
    first = None
    async for chunk in engine.generate(request):
        if first is None and chunk.token_ids:
            first = loop.time() - start
        last = chunk
    assert first is not None
    return first, last


async def _decode_rate(engine: Any, prompt: list[int], batch: int, tokens: int) -> float:
    from engine_backend.types import GenerateRequest, SamplingParams

    async def one(i: int) -> tuple[int, float]:
        request = GenerateRequest(
            rid=f"decode-{batch}-{i}",
            input_ids=prompt + [i + 1],  # a different last token: every request decodes
            sampling=SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True),
        )
        count, started = 0, 0.0
        loop = asyncio.get_running_loop()
        async for chunk in engine.generate(request):
            if not started and chunk.token_ids:
                started = loop.time()  # time decode only, after the first token
                continue
            count += len(chunk.token_ids)
        return count, started

    loop = asyncio.get_running_loop()
    results = await asyncio.gather(*(one(i) for i in range(batch)))
    end = loop.time()
    start = min(s for _, s in results)
    return sum(c for c, _ in results) / (end - start)


async def run_bench(args: argparse.Namespace) -> EngineBenchResult:
    from engine_backend.torch.config import TorchConfig
    from engine_backend.torch.engine import TorchEngine, worker_threads

    config = TorchConfig(
        threads=args.threads,
        chunked_prefill_tokens=args.chunk,
        kv_capacity_tokens=max(8192, 4 * (args.prefix_tokens + 256) + args.batch * 64),
    )
    loop = asyncio.get_running_loop()
    engine = await loop.run_in_executor(None, TorchEngine.from_pretrained, args.model, config)
    prefix = system_prompt(engine.tokenizer, args.prefix_tokens)
    cold: list[float] = []
    cached: list[float] = []
    hits: list[int] = []
    prompt_tokens = 0
    async with engine:
        await _ttft(engine, "warmup", question(engine.tokenizer, 10_000))
        for i in range(args.repeats):
            await engine.flush_cache()
            seconds, final = await _ttft(
                engine, f"cold-{i}", prefix + question(engine.tokenizer, 2 * i)
            )
            cold.append(seconds)
            prompt_tokens = final.prompt_tokens
            seconds, final = await _ttft(
                engine, f"cached-{i}", prefix + question(engine.tokenizer, 2 * i + 1)
            )
            cached.append(seconds)
            hits.append(final.cached_tokens)
        decode: dict[str, float] = {}
        if args.decode_tokens > 0:
            short = prefix[:64]
            for batch in sorted({1, args.batch}):
                decode[str(batch)] = await _decode_rate(engine, short, batch, args.decode_tokens)
    cold_median, cached_median = statistics.median(cold), statistics.median(cached)
    return EngineBenchResult(
        model=str(engine.model_path),
        threads=worker_threads(config),
        prefix_tokens=len(prefix),
        prompt_tokens=prompt_tokens,
        repeats=args.repeats,
        ttft_cold_s=cold,
        ttft_cached_s=cached,
        cached_tokens=hits,
        ttft_cold_median_s=cold_median,
        ttft_cached_median_s=cached_median,
        speedup=cold_median / cached_median,
        prefill_tok_s=prompt_tokens / cold_median,
        decode_tok_s=decode,
    )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="default: embedded SmolLM2")
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: half the cores")
    parser.add_argument("--chunk", type=int, default=512, help="chunked-prefill tokens")
    parser.add_argument("--batch", type=int, default=8, help="decode batch to measure")
    parser.add_argument("--decode-tokens", type=int, default=16, help="0 skips decode")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    started = time.perf_counter()
    result = asyncio.run(run_bench(args))
    table = Table(title=f"torch engine: {Path(result.model).name}, {result.threads} thread(s)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("shared prefix / prompt tokens", f"{result.prefix_tokens} / {result.prompt_tokens}"),
        ("TTFT cold, median (s)", f"{result.ttft_cold_median_s:.3f}"),
        ("TTFT cached prefix, median (s)", f"{result.ttft_cached_median_s:.3f}"),
        ("speedup (cold / cached)", f"{result.speedup:.1f}x"),
        ("cached tokens", ", ".join(map(str, result.cached_tokens))),
        ("prefill tokens/s (cold)", f"{result.prefill_tok_s:.0f}"),
    ]
    rows += [(f"decode tokens/s, batch {b}", f"{v:.1f}") for b, v in result.decode_tok_s.items()]
    rows.append(("wall seconds", f"{time.perf_counter() - started:.1f}"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(result), indent=2))
        console.print(f"wrote {args.json}")
    return 0
