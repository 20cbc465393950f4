"""Map-reduce summary (Parrot): chunk a long text, summarise the chunks in parallel, reduce.

The program creates all N summarise calls and the reduce call before it awaits anything,
so the scheduler receives the whole DAG in one batch: the N summaries run concurrently
(one decode batch) and the reduce starts as soon as the last one ends, without a round
trip to this client. `--sequential` runs the same work one call at a time (each summary
awaited before the next is created), the usual way without semantic variables.

    python examples/map_reduce_summary.py                       # embedded default engine
    python examples/map_reduce_summary.py --chunks 12 --sequential
    python examples/map_reduce_summary.py --url http://127.0.0.1:30080
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from frontend_lang import ProgramResult, Runtime, gen, join, let, program
from frontend_lang.cli_support import run_example

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DOCUMENTS = [REPO / "README.md", REPO / "docs" / "architecture.md"]
SUMMARY_TOKENS = 48
FINAL_TOKENS = 96

# Scripted replies for the sim engine: a summary per chunk, then the final summary.
SCRIPT = [
    {
        "pattern": r"Summary of the whole document:\s*$",
        "reply": "progserve is serving middleware that schedules agentic LLM programs as "
        "units: it captures each program's graph of LLM and tool calls, orders calls by "
        "attained service, keeps prefixes cached across tool gaps, and routes calls to "
        "replicas by cache affinity.",
    },
    {
        "pattern": r"Summarise this part of a document",
        "reply": "This part explains how one layer of progserve works, which interface it "
        "offers to the layer above it, how it is configured, which limits it enforces, and "
        "why it was designed this way rather than the simpler way that most serving systems "
        "still choose today.",
    },
]


def chunk_text(text: str, n: int) -> list[str]:
    """Split `text` into `n` chunks of about equal size, on word boundaries."""
    words = text.split()
    size = max(1, -(-len(words) // n))
    return [" ".join(words[i : i + size]) for i in range(0, len(words), size)]


def summarise_prompt(chunk: object) -> str:
    return (
        "Summarise this part of a document in one sentence.\n\n"
        f"Part:\n{chunk}\n\nOne-sentence summary:"
    )


def reduce_prompt(summaries: object) -> str:
    return (
        "These are one-sentence summaries of the consecutive parts of a document:\n"
        f"{summaries}\n\nSummary of the whole document:"
    )


@program
async def map_reduce(chunks: list[str]) -> str:
    # The chunks are program inputs (`let`): data, never read as templates, sent once.
    parts = [let(chunk, name="chunk") for chunk in chunks]
    summaries = [
        gen(summarise_prompt(part), max_tokens=SUMMARY_TOKENS, temperature=0, name="summary")
        for part in parts
    ]
    final = gen(reduce_prompt(join(summaries)), max_tokens=FINAL_TOKENS, temperature=0)
    return await final


@program
async def sequential_map_reduce(chunks: list[str]) -> str:
    parts = [let(chunk, name="chunk") for chunk in chunks]
    summaries = []
    for part in parts:  # awaiting inside the loop: one call at a time
        summary = gen(
            summarise_prompt(part), max_tokens=SUMMARY_TOKENS, temperature=0, name="summary"
        )
        await summary
        summaries.append(summary)
    final = gen(reduce_prompt(join(summaries)), max_tokens=FINAL_TOKENS, temperature=0)
    return await final


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--file", type=Path, action="append", help="text to summarise (default: the docs)"
    )
    parser.add_argument("--chunks", type=int, default=8, help="number of parallel summaries")
    parser.add_argument(
        "--words", type=int, default=1600, help="summarise the first N words (0: all)"
    )
    parser.add_argument(
        "--sequential", action="store_true", help="one call at a time (the baseline)"
    )


async def main(runtime: Runtime, args: argparse.Namespace) -> ProgramResult[str]:
    text = "\n\n".join(path.read_text() for path in args.file or DEFAULT_DOCUMENTS)
    words = text.split()[: args.words] if args.words else text.split()
    chunks = chunk_text(" ".join(words), args.chunks)
    chosen = sequential_map_reduce if args.sequential else map_reduce
    return await chosen.run(runtime, chunks)


if __name__ == "__main__":
    sys.exit(run_example(main, script=SCRIPT, doc=__doc__, add_arguments=add_arguments))
