"""ReAct agent (Yao et al., 2023) with two server-side tools: `calculator` and `search_docs`
(a local search over this repository's docs).

Each step is one `gen` that writes `Thought:` and `Action: tool[input]` (or
`Final Answer:`). The tool's output variable goes straight into the next step's prompt, so
the scheduler chains tool -> LLM on the server without a round trip to this client; the
client only awaits each step's text to decide what to do next. A tool error becomes an
observation the agent can react to, as in ReAct (the step is redone with the error).

    python examples/react_agent.py                      # embedded default engine
    python examples/react_agent.py --question "What is 2 ** 10?"
    python examples/react_agent.py --url http://127.0.0.1:30080
"""

from __future__ import annotations

import argparse
import re
import sys

from frontend_lang import (
    CallFailedError,
    ProgramResult,
    Runtime,
    SemanticVariable,
    gen,
    program,
    tool,
)
from frontend_lang.cli_support import run_example

QUESTION = (
    "What is 17 * 23 + 4, and which file of this repository describes the scheduling policies?"
)
INSTRUCTIONS = """Answer the question by reasoning step by step. Tools:
- calculator[expression]: evaluates arithmetic, e.g. calculator[2 * (3 + 4)]
- search_docs[query]: searches this project's documentation, returns paths and snippets
Each step writes a Thought, then either `Action: tool[input]` or `Final Answer: answer`.
The tool's result comes back after `Observation:`.
"""
ACTION = re.compile(r"Action:\s*(\w+)\s*\[(.*?)\]", re.DOTALL)
FINAL = re.compile(r"Final Answer:\s*(.*)", re.DOTALL)

# Scripted replies for the sim engine, matched against the end of each step's prompt.
SCRIPT = [
    {
        "pattern": r'Observation: (\d+)\n.*Observation: \[\{"path": "([^"]+)".*Thought:\Z',
        "reply": r" I have both facts now."
        r"\nFinal Answer: 17 * 23 + 4 = \1, and semantic variables are explained in \2.",
    },
    {
        "pattern": r"Observation: (\d+)\n.*Observation: \[\]\nThought:\Z",
        "reply": r" No document matched.\nFinal Answer: 17 * 23 + 4 = \1; no document found.",
    },
    {
        "pattern": r"Observation: (\d+)\nThought:\Z",
        "reply": r" The arithmetic gives \1. Now I need the document."
        "\nAction: search_docs[semantic variables]",
    },
    {
        "pattern": r"Question: .*Thought:\Z",
        "reply": " I should compute the arithmetic first.\nAction: calculator[17 * 23 + 4]",
    },
]
TOOL_ARGUMENT = {"calculator": "expression", "search_docs": "query"}


@program
async def react(question: str, max_steps: int = 6) -> str:
    prompt = f"{INSTRUCTIONS}\nQuestion: {question}\n"
    last_tool: tuple[SemanticVariable, str] | None = None  # (observation, prompt before it)
    for _ in range(max_steps):
        step = gen(prompt + "Thought:", max_tokens=96, stop=["\nObservation:"], temperature=0)
        try:
            text = await step
        except CallFailedError:
            error = await tool_error(last_tool[0]) if last_tool else None
            if last_tool is None or error is None:
                raise
            # The tool failed, so this step never ran: show the agent the error instead.
            prompt = last_tool[1] + f"Observation: error: {error}\n"
            last_tool = None
            continue
        if final := FINAL.search(text):
            return final.group(1).strip()
        prompt += f"Thought:{step}\n"
        action = ACTION.search(text)
        if action is None:
            prompt += "Observation: no action found; write `Action: tool[input]`.\n"
            continue
        name, argument = action.group(1), action.group(2).strip()
        if name not in TOOL_ARGUMENT:
            prompt += f"Observation: unknown tool {name!r}; use {', '.join(TOOL_ARGUMENT)}.\n"
            continue
        observation = tool(name, **{TOOL_ARGUMENT[name]: argument})
        last_tool = (observation, prompt)
        # Not awaited: the next step's prompt references the tool's output variable, so
        # the scheduler runs the step as soon as the tool is done, with no round trip.
        prompt += f"Observation: {observation}\n"
    return await gen(prompt + "Final Answer:", max_tokens=64, temperature=0)


async def tool_error(observation: SemanticVariable) -> str | None:
    try:
        await observation
    except CallFailedError as exc:
        return exc.cause
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--max-steps", type=int, default=6)


async def main(runtime: Runtime, args: argparse.Namespace) -> ProgramResult[str]:
    return await react.run(runtime, args.question, args.max_steps)


if __name__ == "__main__":
    sys.exit(run_example(main, script=SCRIPT, doc=__doc__, add_arguments=add_arguments))
