"""LLMCompiler (Kim et al., ICML 2024): a planner writes a plan of tool tasks whose inputs
reference earlier tasks' results (`$k`), a task-fetching unit runs each task as soon as
the tasks it references are done, and a joiner answers.

The plan is JSON, constrained by a JSON schema (a list of calculator steps, each an
arithmetic expression over numbers and `$k` references), so even a 135M model writes a
plan the program can run; two worked examples in the system prompt show the format. The
program reads the plan while the planner is still writing it: each step becomes a DSL
`tool` call the moment its JSON object closes, with the `$k` in its expression replaced by
task k's result variable. The DSL sends each task at once, and the scheduler starts it
the moment its inputs resolve: task fetching happens on the server's data-flow graph, in
streaming mode. The joiner sees the question, the plan and every step's result, and
answers with a number (a regex-constrained `gen`: an integer when every result is one). A plan that cannot run (a reference to no earlier task, a task
that fails) is planned again, up to `--max-replans` times.

SmolLM2-135M plans two-part questions like the default one from the examples; the planner
of a harder question needs a larger model. The example checks its own answer: the
default question's 13 * 7 + 9 ** 2 = 172, as the calculator computed it.

    python examples/llm_compiler.py                        # embedded default engine
    python examples/llm_compiler.py --url http://127.0.0.1:30080
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from frontend_lang import (
    CallFailedError,
    ProgramResult,
    Runtime,
    SemanticVariable,
    assistant,
    gen,
    program,
    system,
    tool,
    user,
)
from frontend_lang.cli_support import run_example
from frontend_lang.example_checks import exact_check

QUESTION = "What is 13 * 7 plus 9 squared?"
EXPECTED = "172"
MAX_STEPS = 5
PLAN_SCHEMA = {
    "type": "array",
    "minItems": 1,
    "maxItems": MAX_STEPS,
    "items": {
        "type": "object",
        "properties": {
            "expression": {"type": "string", "pattern": r"^[0-9$(][0-9$ +*/().-]{0,40}$"}
        },
        "required": ["expression"],
        "additionalProperties": False,
    },
}
PLANNER = (
    "You plan calculations for a calculator. Write a JSON list of steps. Each step is an "
    "arithmetic expression; $1, $2, ... stand for the results of earlier steps. Steps that "
    "do not use each other's results run in parallel.\n"
    'Example: What is 6 * 7 plus 5 squared?\n'
    '[{"expression":"6 * 7"},{"expression":"5 ** 2"},{"expression":"$1 + $2"}]\n'
    'Example: What is 4 * 11 minus 3 squared?\n'
    '[{"expression":"4 * 11"},{"expression":"3 ** 2"},{"expression":"$1 - $2"}]'
)
JOINER = "You answer questions with a calculator."
# The answer's form follows the results': integers when every step gave one.
INTEGER = r"-?[0-9]{1,12}"
NUMBER = r"-?[0-9]{1,12}(\.[0-9]{1,6})?"
_STEP = re.compile(r"\{[^{}]*\}")  # a step's object (flat: the schema allows no nesting)
_REF = re.compile(r"\$(\d+)")

# Scripted replies for the sim engine: a plan of two independent steps and one that
# depends on both, then the joiner's answer copied from the last step's result.
SCRIPT = [
    {
        "pattern": r"What is (\d+) \* (\d+) plus (\d+) squared\?<\|im_end\|>\n"
        r"<\|im_start\|>assistant\n\Z",
        "reply": r'[{"expression":"\1 * \2"},{"expression":"\3 ** 2"},'
        r'{"expression":"$1 + $2"}]',
    },
    {"pattern": r"Step 3: [^\n]* = (\d+)\nGive the final answer as a number\.<\|im_end\|>\n"
     r"<\|im_start\|>assistant\n\Z", "reply": r"\1"},
]


class PlanError(ValueError):
    """The plan cannot run: a step references no earlier step."""


@program
async def llm_compiler(question: str, max_replans: int = 1) -> dict[str, Any]:
    feedback = ""
    for round_index in range(max_replans + 1):
        plan = gen([system(PLANNER), user(f"{feedback}{question}")], json_schema=PLAN_SCHEMA,
                   max_tokens=120, temperature=0, name="plan")
        try:
            tasks = await fetch_tasks(plan)
            results = await observations(tasks)
        except (PlanError, CallFailedError) as exc:
            feedback = f"The previous plan failed ({exc}). Plan again.\n"
            continue
        # The joiner sees the question, the plan (its own turn) and the results.
        values = [await result for _, result in tasks]
        integers = all(re.fullmatch(r"-?\d+", value) for value in values)
        joined = gen([system(JOINER), user(f"Question: {question}"), assistant(f"{plan}"),
                      user(f"Calculator results:\n{results}Give the final answer as a "
                           f"number.")],
                     regex=INTEGER if integers else NUMBER, max_tokens=16, temperature=0,
                     name="answer")
        return {"answer": (await joined).strip(), "rounds": round_index + 1,
                "steps": [expression for expression, _ in tasks],
                "last_result": await tasks[-1][1] if tasks else None}
    return {"answer": "no plan ran", "rounds": max_replans + 1, "steps": [],
            "last_result": None}


async def fetch_tasks(plan: SemanticVariable) -> list[tuple[str, SemanticVariable]]:
    """Read the plan as it streams; each step becomes a calculator call at once (the DSL
    sends it at the next stream step, and the scheduler starts it when its inputs are
    done)."""
    text, taken = "", 0
    tasks: list[tuple[str, SemanticVariable]] = []
    async for delta in plan.stream():
        text += delta
        for match in list(_STEP.finditer(text))[taken:]:
            expression = json.loads(match.group(0))["expression"]
            tasks.append((expression, tool("calculator", name=f"task{len(tasks) + 1}",
                                           expression=as_template(expression, tasks))))
            taken += 1
    if not tasks:
        raise PlanError("the plan has no steps")
    return tasks


def as_template(expression: str, earlier: list[tuple[str, SemanticVariable]]) -> str:
    """`$k` in a step becomes task k's result variable (a placeholder the server fills)."""
    def ref(match: re.Match[str]) -> str:
        k = int(match.group(1))
        if not 1 <= k <= len(earlier):
            raise PlanError(f"step {len(earlier) + 1} references ${k}, which is no earlier "
                            f"step")
        return f"({earlier[k - 1][1]})"

    return _REF.sub(ref, expression)


async def observations(tasks: list[tuple[str, SemanticVariable]]) -> str:
    """The joiner's view: each step with its result (the variable itself, so the server
    fills in its text). A failed step fails the plan."""
    lines = []
    for index, (expression, result) in enumerate(tasks, 1):
        await result
        lines.append(f"Step {index}: {expression} = {result}\n")
    return "".join(lines)


def check(result: ProgramResult[dict[str, Any]], question: str) -> dict[str, Any]:
    """The default question: 172 exactly, as the calculator computed it (the last step's
    result); any other: the answer is the last step's result."""
    value = result.value
    if question == QUESTION:
        return exact_check(value["answer"], EXPECTED, passed=value["last_result"] == EXPECTED,
                           expected="172, the calculator's result of the plan's last step")
    return exact_check(value["answer"], value["last_result"],
                       expected="the calculator's result of the plan's last step")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--max-replans", type=int, default=1)


async def main(runtime: Runtime, args: argparse.Namespace) -> ProgramResult[dict[str, Any]]:
    result = await llm_compiler.run(runtime, args.question, args.max_replans)
    result.value["tasks_started_while_planning"] = started_while_planning(result)
    result.check = check(result, args.question)
    return result


def started_while_planning(result: ProgramResult[Any]) -> int:
    """Tasks the scheduler started before the planner had finished writing the plan
    (streaming task fetching), from the call timings in the program's state."""
    if result.state is None:
        return 0
    calls = result.state.calls
    plan_ends = [c.finished_at for c in calls if c.output and c.output.startswith("plan")]
    tasks = [c for c in calls if c.kind == "tool" and c.dispatched_at is not None]
    if not plan_ends:
        return 0
    return sum(1 for c in tasks if c.dispatched_at < min(t for t in plan_ends if t))


if __name__ == "__main__":
    sys.exit(run_example(main, script=SCRIPT, doc=__doc__, add_arguments=add_arguments))
