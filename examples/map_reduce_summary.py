"""Map-reduce summary (Parrot): chunk a long text, summarise the chunks in parallel, reduce.

The program creates all N summarise calls and the reduce call before it awaits anything,
so the scheduler receives the whole DAG in one batch: the N summaries run concurrently
(one decode batch) and the reduce starts as soon as the last one ends, without a round
trip to this client. `--sequential` runs the same work one call at a time (each summary
awaited before the next is created), the usual way without semantic variables.

Every call is a chat (system + user roles, rendered with the model's own template): an
instruct model asked in its template writes a sentence; asked with bare text it continues
the text (a markdown document gets more markdown). The chunks are plain text (markdown
syntax removed), and every summary shares one system prompt, which the prefix cache
serves once. The example checks its own answer: plain sentences, no markdown lines,
nothing repeated, and at least two key terms of the source.

    python examples/map_reduce_summary.py                       # embedded default engine
    python examples/map_reduce_summary.py --chunks 12 --sequential
    python examples/map_reduce_summary.py --url http://127.0.0.1:30080
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from frontend_lang import (
    ProgramResult,
    Runtime,
    gen,
    join,
    let,
    program,
    system,
    user,
)
from frontend_lang.cli_support import run_example
from frontend_lang.example_checks import complete_sentences, prose_check

# A plain-prose document (`--file` summarises others: markdown is turned into plain text).
DEFAULT_DOCUMENTS = [Path(__file__).resolve().parent / "data" / "agent_programs.txt"]
SUMMARY_TOKENS = 40
FINAL_TOKENS = 80
SYSTEM = "You summarise technical documents in plain sentences."

# Scripted replies for the sim engine: a summary per chunk, then the final summary.
SCRIPT = [
    {
        "pattern": r"Summarise the text above in two sentences",
        "reply": "progserve is serving middleware that schedules agentic LLM programs as "
        "units: it captures each program's graph of LLM and tool calls, orders calls by "
        "attained service, keeps prefixes cached across tool gaps, and routes calls to "
        "replicas by cache affinity.",
    },
    {
        "pattern": r"Summarise the text above in one sentence",
        "reply": "This part explains how one layer of progserve works, which interface it "
        "offers to the layer above it, and which limits it enforces.",
    },
]


def plain_text(markdown: str) -> str:
    """Markdown as plain words: no headings, list markers, tables, code fences or
    inline markup (the model would otherwise continue the markup)."""
    text = re.sub(r"```.*?```", " ", markdown, flags=re.DOTALL)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links -> their text
    text = re.sub(r"[#*`|>_]+", " ", text)
    text = re.sub(r"^\s*[-+]\s+", " ", text, flags=re.MULTILINE)
    return re.sub(r"\s+", " ", text).strip()


def chunk_text(text: str, n: int) -> list[str]:
    """Split `text` into `n` chunks of about equal size, on word boundaries."""
    words = text.split()
    size = max(1, -(-len(words) // n))
    return [" ".join(words[i : i + size]) for i in range(0, len(words), size)]


# The instruction follows the text: a small model follows the last thing it read.
def summarise_prompt(chunk: object) -> list:
    return [system(SYSTEM), user(f"{chunk}\n\nSummarise the text above in one sentence.")]


def reduce_prompt(summaries: object) -> list:
    return [system(SYSTEM),
            user(f"{summaries}\n\nSummarise the text above in two sentences.")]


@program
async def map_reduce(chunks: list[str]) -> str:
    # The chunks are program inputs (`let`): data, never read as templates, sent once.
    parts = [let(chunk, name="chunk") for chunk in chunks]
    summaries = [
        gen(summarise_prompt(part), max_tokens=SUMMARY_TOKENS, temperature=0, name="summary")
        for part in parts
    ]
    final = gen(reduce_prompt(join(summaries)), max_tokens=FINAL_TOKENS, temperature=0)
    return complete_sentences(await final)


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
    return complete_sentences(await final)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--file", type=Path, action="append",
        help="text to summarise (default: examples/data/agent_programs.txt)",
    )
    parser.add_argument("--chunks", type=int, default=4, help="number of parallel summaries")
    parser.add_argument(
        "--words", type=int, default=0, help="summarise the first N words (0: all)"
    )
    parser.add_argument(
        "--sequential", action="store_true", help="one call at a time (the baseline)"
    )


def source_text(files: list[Path] | None, words: int) -> str:
    text = plain_text("\n\n".join(path.read_text() for path in files or DEFAULT_DOCUMENTS))
    return " ".join(text.split()[:words] if words else text.split())


async def main(runtime: Runtime, args: argparse.Namespace) -> ProgramResult[str]:
    source = source_text(args.file, args.words)
    chosen = sequential_map_reduce if args.sequential else map_reduce
    result = await chosen.run(runtime, chunk_text(source, args.chunks))
    result.check = prose_check(result.value, source)
    return result


if __name__ == "__main__":
    sys.exit(run_example(main, script=SCRIPT, doc=__doc__, add_arguments=add_arguments))
