"""A LangGraph agent through progserve's OpenAI-compatible proxy: `create_react_agent` with
`ChatOpenAI(base_url=<progserve>/v1)` and one Python tool.

The model is shown the tool (the Hermes tools block when its chat template has none, as
SmolLM2's has none). Its first turn has `tool_choice` set to the tool, which the torch
engine enforces with constrained decoding, so even a 135M model calls it with valid
arguments; once the tool's result is back, the model answers in words (`tool_choice:
"none"`, chosen per turn by LangGraph's dynamic model hook). Every request carries
`X-Program-Id`, so progserve schedules the agent's calls as one program and keeps its
prefix cached between turns. `--stream` makes the model calls stream (SSE).

Needs `pip install langgraph langchain-openai` (the `langgraph` extra; not a dependency
of progserve itself). Without `--url` it starts its own progserve server in this process.
The example checks its own answer: multiply was called with 17 and 23, and the answer
states the tool's exact result, 391.

    python examples/langgraph_agent.py                     # in-process server
    python examples/langgraph_agent.py --stream --url http://127.0.0.1:30080
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import time
import uuid
import warnings
from typing import Any

import httpx

from frontend_lang import ProgramResult
from frontend_lang.cli_support import example_parser, report, serve_in_background
from scheduler.spec import ProgramState

QUESTION = "What is 17 x 23?"
EXPECTED = "391"
SYSTEM = "You are a helpful assistant. Use the multiply tool for arithmetic, then state its result."
ASSISTANT_TURN = r"<\|im_end\|>\n<\|im_start\|>assistant\n\Z"

# Scripted replies for the sim engine, over the ChatML prompt the proxy renders: the call
# (the forced turn's JSON), then the answer once the tool's result is back.
SCRIPT = [
    {"pattern": r"<tool_response>\n(\d+)\n</tool_response>" + ASSISTANT_TURN,
     "reply": r"17 x 23 = \1."},
    {"pattern": r"What is 17 x 23\?" + ASSISTANT_TURN,
     "reply": '{"name":"multiply","arguments":{"a":17,"b":23}}'},
]


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def build_agent(url: str, model: str, program_id: str, api_key: str | None, stream: bool,
                http: httpx.AsyncClient) -> Any:
    from langchain_core.messages import ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from langgraph.prebuilt import create_react_agent

    tools = [tool(multiply)]
    llm = ChatOpenAI(base_url=f"{url}/v1", api_key=api_key or "none", model=model,
                     temperature=0, max_tokens=64, streaming=stream,
                     default_headers={"X-Program-Id": program_id},
                     http_async_client=http)  # ours: closed with this run's event loop
    call_it = llm.bind_tools(tools, tool_choice="multiply")  # enforced by the engine
    answer = llm.bind_tools(tools, tool_choice="none")

    def model_for(state: dict[str, Any], _runtime: Any) -> Any:
        # The tool first; after its result, the answer in words.
        return answer if isinstance(state["messages"][-1], ToolMessage) else call_it

    with warnings.catch_warnings():  # LangGraph 1.x points to langchain.agents instead
        warnings.simplefilter("ignore")
        return create_react_agent(model_for, tools, prompt=SYSTEM)


async def run(url: str, args: argparse.Namespace) -> ProgramResult[dict[str, Any]]:
    program_id = f"langgraph-{uuid.uuid4().hex[:12]}"
    async with httpx.AsyncClient(timeout=600) as http:
        auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        # The served model's name, as the server lists it (OpenAI servers answer 404 for
        # a name they do not serve).
        models = (await http.get(f"{url}/v1/models", headers=auth)).json()["data"]
        agent = build_agent(url, models[0]["id"], program_id, args.api_key, args.stream, http)
        started = time.perf_counter()
        state = await agent.ainvoke({"messages": [("user", args.question)]})
        latency = time.perf_counter() - started
    messages = state["messages"]
    calls = [c for m in messages for c in getattr(m, "tool_calls", None) or ()]
    results = [m.content for m in messages if m.type == "tool"]
    value = {"answer": messages[-1].content, "tool_calls": [
        {"name": c["name"], "args": c["args"]} for c in calls], "tool_results": results}
    auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=url, headers=auth) as http:
        (await http.post(f"/v1/programs/{program_id}/end")).raise_for_status()
        response = await http.get(f"/v1/programs/{program_id}")
        response.raise_for_status()
    result = ProgramResult(value, program_id, latency,
                           ProgramState.model_validate(response.json()))
    result.check = check(value, args.question)
    return result


def check(value: dict[str, Any], question: str) -> dict[str, Any]:
    """multiply(17, 23) was called, returned 391, and the answer states 391."""
    if question != QUESTION:
        return {"passed": bool(value["tool_calls"]), "expected": "a tool call"}
    called = {"name": "multiply", "args": {"a": 17, "b": 23}} in value["tool_calls"]
    passed = called and EXPECTED in value["tool_results"] and EXPECTED in value["answer"]
    result = {"passed": passed,
              "expected": "multiply(a=17, b=23) called, its result 391 stated in the answer"}
    if not passed:
        result["why"] = json.dumps(value)[:300]
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--stream", action="store_true", help="stream the model calls")


def main(argv: list[str] | None = None) -> int:
    args = example_parser(__doc__, add_arguments).parse_args(argv)
    if args.print_script:
        print(json.dumps(SCRIPT))
        return 0
    missing = [m for m in ("langgraph", "langchain_openai") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"skipped: {', '.join(missing)} not installed (pip install 'progserve[langgraph]')")
        return 0
    with serve_in_background(args, SCRIPT) as url:
        result = asyncio.run(run(url, args))
    report(result, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
