"""LLMCompiler (Kim et al., ICML 2024): a planner writes numbered tool tasks with `$k`
references, a task-fetching unit runs each task as soon as the tasks it references are
done, and a joiner answers (or asks for a new plan).

The plan is parsed with the tools layer's streaming plan parser
(`scheduler.tools.llmcompiler.PlanParser`) while the planner is still writing it; each
parsed task becomes a DSL `tool` call whose `$k` arguments are the variables of earlier
tasks. The DSL sends each task the moment it is parsed, and the scheduler starts it the
moment its inputs resolve: task fetching happens on the server's data-flow graph, in
streaming mode. The joiner reads every observation; a failed task shows up as its error.

    python examples/llm_compiler.py                        # embedded default engine
    python examples/llm_compiler.py --url http://127.0.0.1:30080
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
    gen,
    program,
    tool,
)
from frontend_lang.cli_support import run_example
from scheduler.tools.builtin import register_builtin_tools
from scheduler.tools.errors import JoinerOutputError, PlanError
from scheduler.tools.llmcompiler import (
    END_OF_PLAN,
    PlanParser,
    PlanTask,
    Ref,
    parse_joiner_output,
    planner_instructions,
)
from scheduler.tools.registry import ToolRegistry

QUESTION = (
    "What is 17 * 23 plus 12 squared, and where does this project explain semantic variables?"
)
JOINER = (
    "Answer the question from the observations. Write `Thought: ...` then "
    "`Action: Finish(answer)`, or `Action: Replan(reason)` if the observations are not enough."
)
_REF = re.compile(r"\$\{?(\d+)\}?")

# Scripted replies for the sim engine: a plan with three independent tasks and one that
# depends on two of them, then the joiner's answer built from the observations.
SCRIPT = [
    {
        "pattern": r"Question: .*\nPlan:\n\Z",
        "reply": "Thought: the two products are independent, and so is the search.\n"
        '1. calculator("17 * 23")\n'
        '2. calculator("12 ** 2")\n'
        '3. search_docs("semantic variables")\n'
        "Thought: then add the two numbers.\n"
        '4. calculator("$1 + $2")\n'
        f"5. join(){END_OF_PLAN}",
    },
    {
        "pattern": r'Task 3 \(search_docs\): Observation: \[\{"path": "([^"]+)".*'
        r"Task 4 \(calculator\): Observation: (\d+)\n.*Thought:\Z",
        "reply": r" Task 4 added the two products; task 3 found the document."
        r"\nAction: Finish(17 * 23 + 12 ** 2 = \2; semantic variables are explained in \1)",
    },
    {
        "pattern": r"Task 4 \(calculator\): Observation: (\d+)\n.*Thought:\Z",
        "reply": r" Task 4 added the two products.\nAction: Finish(17 * 23 + 12 ** 2 = \1)",
    },
]


def client_registry() -> ToolRegistry:
    """The tool names and signatures the planner may use (for parsing and checking plans;
    the tools themselves run on the server)."""
    return register_builtin_tools(ToolRegistry(), docs_root=".")


@program
async def llm_compiler(question: str, max_replans: int = 1) -> dict[str, Any]:
    registry = client_registry()
    context = ""
    for round_index in range(max_replans + 1):
        final = round_index == max_replans
        plan = gen(
            f"{planner_instructions(registry, replan=bool(context))}\n"
            f"Question: {question}\n{context}Plan:\n",
            max_tokens=256,
            stop=[END_OF_PLAN],
            temperature=0,
            name="plan",
        )
        try:
            tasks = await fetch_tasks(plan, registry)
        except PlanError as exc:  # a malformed plan: ask for another one
            if final:
                return {"answer": f"no valid plan: {exc}", "rounds": round_index + 1}
            context += f"The previous plan was invalid: {exc}\n"
            continue
        scratchpad = f"Plan:\n{plan}\n{await observations(tasks)}"
        joined = gen(
            f"{JOINER}\nQuestion: {question}\n{scratchpad}Thought:",
            max_tokens=96,
            temperature=0,
            name="joiner",
        )
        text = "Thought:" + await joined
        try:
            decision = parse_joiner_output(text)
        except JoinerOutputError:
            return {"answer": text.strip(), "rounds": round_index + 1}
        if not decision.replan or final:
            return {"answer": decision.answer, "rounds": round_index + 1}
        context += f"Previous plan:\n{scratchpad}Replan because: {decision.answer}\n"
    raise AssertionError("unreachable")


async def fetch_tasks(
    plan: SemanticVariable, registry: ToolRegistry
) -> list[tuple[PlanTask, SemanticVariable]]:
    """Parse the plan as it streams; each task becomes a tool call at once (the DSL sends
    it at the next stream step, and the scheduler starts it when its inputs are done)."""
    parser = PlanParser(registry)
    results: dict[int, SemanticVariable] = {}
    tasks: list[tuple[PlanTask, SemanticVariable]] = []

    def dispatch(parsed: list[PlanTask]) -> None:
        for task in parsed:
            if task.is_join:
                continue
            named = registry.get(task.tool).bind(task.kwargs, task.args)
            args = {key: as_template(value, results) for key, value in named.items()}
            results[task.index] = tool(task.tool, name=f"task{task.index}", **args)
            tasks.append((task, results[task.index]))

    async for delta in plan.stream():
        dispatch(parser.feed(delta))
    dispatch(parser.close())
    return tasks


def as_template(value: Any, results: dict[int, SemanticVariable]) -> Any:
    """A plan argument as a DSL tool argument: `$k` becomes task k's variable."""
    if isinstance(value, Ref):
        return results[value.task]
    if isinstance(value, str):
        return _REF.sub(lambda m: str(results[int(m.group(1))]), value)
    return value


async def observations(tasks: list[tuple[PlanTask, SemanticVariable]]) -> str:
    """The joiner's view of the plan's outcome: each task with its observation (the result
    variable itself, so the server fills in its text) or its error."""
    lines = []
    for task, result in tasks:
        try:
            await result
            outcome = f"Observation: {result}"
        except CallFailedError as exc:
            outcome = f"Error: {exc.cause}"
        lines.append(f"Task {task.index} ({task.tool}): {outcome}\n")
    return "".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--max-replans", type=int, default=1)


async def main(runtime: Runtime, args: argparse.Namespace) -> ProgramResult[dict[str, Any]]:
    result = await llm_compiler.run(runtime, args.question, args.max_replans)
    result.value["tasks_started_while_planning"] = started_while_planning(result)
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
