"""The ReAct agent written against the plain `openai` client, through progserve's
OpenAI-compatible proxy (no DSL): tools are offered with `tools=`, the model answers with
(parallel) `tool_calls`, and this client runs the tools and sends their results back.

What makes it a *program* to progserve are three headers on every request:
`X-Program-Id` (the agent run), `X-Thread-Id` and `X-Parent-Call-Ids` (the previous call,
read from the `X-Call-Id` answer header). The scheduler then ranks the run's calls by the
service the whole run has received and keeps its prefix cached between turns; the run
ends with `POST /v1/programs/{id}/end`. Without `--url` the example starts its own
progserve server in this process on a free loopback port.

    python examples/openai_client_agent.py                    # in-process server
    python examples/openai_client_agent.py --url http://127.0.0.1:30080
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI

from frontend_lang import ProgramResult
from frontend_lang.cli_support import example_parser, report, serve_in_background
from scheduler.spec import ProgramState
from scheduler.tools.builtin import DocumentSearch, evaluate_arithmetic

QUESTION = "What is 17 * 23 + 4, and which document of this repository explains semantic variables?"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression.",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_docs",
            "description": "Search this project's documentation; returns paths and snippets.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    },
]
ASSISTANT_TURN = r"<\|im_end\|>\n<\|im_start\|>assistant\n\Z"

# Scripted replies for the sim engine, over the ChatML prompt the proxy renders: first two
# parallel tool calls, then (once both results are back) the answer.
SCRIPT = [
    {
        "pattern": r"<tool_response>\n(\d+)\n</tool_response>\n<tool_response>\n"
        r'.*?"path": "([^"]+)".*' + ASSISTANT_TURN,
        "reply": r"17 * 23 + 4 = \1, and semantic variables are explained in \2.",
    },
    {
        "pattern": r"<tool_response>\n(\d+)\n</tool_response>.*" + ASSISTANT_TURN,
        "reply": r"17 * 23 + 4 = \1; no document matched.",
    },
    {
        "pattern": r"user\n[^<]*\?" + ASSISTANT_TURN,
        "reply": '<tool_call>\n{"name": "calculator", "arguments": {"expression": '
        '"17 * 23 + 4"}}\n</tool_call>\n<tool_call>\n{"name": "search_docs", '
        '"arguments": {"query": "semantic variables"}}\n</tool_call>',
    },
]


class ClientTools:
    """The tools, run here in the client (as an OpenAI-client agent does)."""

    def __init__(self, docs: Path | None) -> None:
        self._search = DocumentSearch(docs) if docs else None

    async def run(self, name: str, arguments: str) -> str:
        try:
            args = json.loads(arguments)
            if name == "calculator":
                return str(evaluate_arithmetic(str(args["expression"])))
            if name == "search_docs" and self._search is not None:
                hits = await asyncio.to_thread(self._search, str(args["query"]), 2)
                return json.dumps([{"path": h["path"], "snippet": h["snippet"]} for h in hits])
            return f"error: unknown tool {name!r}"
        except Exception as exc:  # noqa: BLE001 - the model sees the error and goes on
            return f"error: {type(exc).__name__}: {exc}"


async def react(
    client: AsyncOpenAI,
    model: str,
    tools: ClientTools,
    question: str,
    program_id: str,
    max_turns: int = 6,
) -> str:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Answer with the help of the tools."},
        {"role": "user", "content": question},
    ]
    parent: str | None = None
    for _ in range(max_turns):
        headers = {"X-Program-Id": program_id, "X-Thread-Id": "main"}
        if parent:
            headers["X-Parent-Call-Ids"] = parent
        raw = await client.chat.completions.with_raw_response.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            max_tokens=128,
            temperature=0,
            extra_headers=headers,
        )
        parent = raw.headers.get("X-Call-Id")
        message = raw.parse().choices[0].message
        if not message.tool_calls:
            return message.content or ""
        messages.append(message.model_dump(exclude_none=True))
        # Parallel tool calls run concurrently.
        results = await asyncio.gather(
            *(tools.run(c.function.name, c.function.arguments) for c in message.tool_calls)
        )
        messages += [
            {"role": "tool", "tool_call_id": call.id, "content": result}
            for call, result in zip(message.tool_calls, results, strict=True)
        ]
    return "no answer within the turn limit"


async def run(url: str, args: argparse.Namespace) -> ProgramResult[str]:
    program_id = f"openai-react-{uuid.uuid4().hex[:12]}"
    auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with (
        AsyncOpenAI(base_url=f"{url}/v1", api_key=args.api_key or "none") as client,
        httpx.AsyncClient(base_url=url, headers=auth) as http,
    ):
        model = (await client.models.list()).data[0].id
        started = time.perf_counter()
        answer = await react(client, model, ClientTools(args.docs), args.question, program_id)
        latency = time.perf_counter() - started
        (await http.post(f"/v1/programs/{program_id}/end")).raise_for_status()
        response = await http.get(f"/v1/programs/{program_id}")
        response.raise_for_status()
    return ProgramResult(answer, program_id, latency, ProgramState.model_validate(response.json()))


def main(argv: list[str] | None = None) -> int:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--question", default=QUESTION)

    args = example_parser(__doc__, add_arguments).parse_args(argv)
    with serve_in_background(args, SCRIPT) as url:
        result = asyncio.run(run(url, args))
    report(result, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
