"""ReAct agent (Yao et al., 2023) that a small model can drive: the program gives the
structure, the model makes the decisions, the tools compute.

Each step is a turn of a conversation (chat roles, rendered with the model's own chat
template): the model picks the next action with a constrained `select` over the action
names (`calculator`, `finish`), then writes the action's input, constrained
by a regex (arithmetic for the calculator); the server-side tool runs it and its result
comes back as the next user turn. The tool's output variable goes straight into the next
step's prompt, so the scheduler chains tool -> LLM without a round trip to this client.
`finish` asks for the answer (a number when the question is arithmetic).

The example checks its own answer: for the default question, 17 * 23 + 4 = 395, computed
by the calculator tool (the model only copies the observation).

    python examples/react_agent.py                      # embedded default engine
    python examples/react_agent.py --question "What is 2 ** 10?"
    python examples/react_agent.py --url http://127.0.0.1:30080
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from frontend_lang import (
    CallFailedError,
    ProgramResult,
    Runtime,
    SemanticVariable,
    assistant,
    conversation,
    gen,
    program,
    select,
    system,
    tool,
    user,
)
from frontend_lang.cli_support import run_example
from frontend_lang.example_checks import exact_check

QUESTION = "What is 17 * 23 + 4?"
EXPECTED = "395"
# The actions a 135M model chooses between reliably. (Offered a third one, a document
# search, SmolLM2-135M picked it about as often as the right action: choices among many
# actions need a larger model.)
ACTIONS = ["calculator", "finish"]
SYSTEM = (
    "You are an agent that answers questions with tools. Tools:\n"
    "- calculator: evaluates an arithmetic expression, for example 2 * (3 + 4)\n"
    "- finish: you know the answer\n"
    "Each turn you name one tool, then give its input. Tool results come back as "
    "observations."
)
NEXT = "Which tool do you use next: calculator or finish?"
# What the model may write as each tool's input (and the argument it is passed as).
INPUTS = {"calculator": ("expression", r"[0-9(][0-9 +*/().-]{0,40}")}
NUMBER = r"-?[0-9]{1,12}(\.[0-9]{1,6})?"
ANSWER = r"[A-Za-z0-9][^\n]{0,100}"

# Scripted replies for the sim engine, matched against the end of each rendered prompt
# (ChatML: the sim engine reports no template of its own).
TURN_END = r"<\|im_end\|>\n<\|im_start\|>assistant\n\Z"
SCRIPT = [
    {"pattern": r"Observation: [0-9.]+\n" + re.escape(NEXT) + TURN_END, "reply": "finish"},
    {"pattern": r"Question: [^<]*\n" + re.escape(NEXT) + TURN_END, "reply": "calculator"},
    {"pattern": r"Question: What is ([0-9 *+]+)\?.*Input for calculator:" + TURN_END,
     "reply": r"\1"},
    {"pattern": r"Observation: ([0-9.]+)\n.*final answer[^<]*" + TURN_END, "reply": r"\1"},
]


@program
async def react(question: str, max_steps: int = 4) -> str:
    s = conversation(system(SYSTEM), user(f"Question: {question}\n{NEXT}"))
    numeric = _is_arithmetic(question)
    for _ in range(max_steps):
        s += assistant(select(choices=ACTIONS, name="action"))
        action = await s["action"]
        if action == "finish":
            break
        argument, pattern = INPUTS[action]
        s += user(f"Input for {action}:")
        s += assistant(gen(regex=pattern, max_tokens=24, temperature=0, name="input"))
        observation = tool(action, name="observation", **{argument: s["input"]})
        # Not awaited: the next step's prompt references the tool's output variable, so
        # the scheduler runs that step as soon as the tool is done.
        s += user(f"Observation: {await _observed(observation)}\n{NEXT}")
    s += user("Give the final answer" + (" as a number." if numeric else "."))
    s += assistant(gen(regex=NUMBER if numeric else ANSWER, max_tokens=32, temperature=0,
                       name="answer"))
    return (await s["answer"]).strip()


async def _observed(observation: SemanticVariable) -> Any:
    """The observation as the next prompt shows it: the tool's output variable (filled in on
    the server), or, when the tool failed, its error, so the agent can react to it."""
    try:
        await observation
    except CallFailedError as exc:
        return f"error: {exc.cause}"
    return observation


def _is_arithmetic(question: str) -> bool:
    return any(ch.isdigit() for ch in question)


def check(result: ProgramResult[str], question: str) -> dict[str, Any]:
    """Passed when the answer is the calculator's result (395 for the default question)
    and the calculator really computed it."""
    if question != QUESTION:
        return {"passed": bool(result.value), "expected": "a non-empty answer"}
    observed = [v for k, v in (result.state.variables if result.state else {}).items()
                if k.startswith("observation")]
    return exact_check(result.value, EXPECTED, passed=EXPECTED in observed,
                       expected="395, computed by the calculator tool")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--max-steps", type=int, default=4)


async def main(runtime: Runtime, args: argparse.Namespace) -> ProgramResult[str]:
    result = await react.run(runtime, args.question, args.max_steps)
    result.check = check(result, args.question)
    return result


if __name__ == "__main__":
    sys.exit(run_example(main, script=SCRIPT, doc=__doc__, add_arguments=add_arguments))
