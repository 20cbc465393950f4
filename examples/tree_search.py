"""Tree search with a verifier (Tree of Thoughts / LATS style) on the 24 game: combine
2, 3, 4 and 6 with + - * / into 24.

The program gives the structure, the model makes the choices, tools compute:
- a node is a conversation (chat roles) that lists the numbers left; expanding it forks
  the conversation into one branch per operator (`fork` prefills the node once, so the
  branches share its KV), and in each branch the model picks a step with a constrained
  `select` over the legal steps with that operator (the program computes each step's
  result, e.g. "4 * 6 = 24": a small model cannot do arithmetic);
- after `--depth` steps two numbers are left, and the verifier asks the `calculator` tool
  for every way to combine them: an expression that evaluates to 24 is a solution. The
  leaves are verified in the model's order (branch by branch); the first verified
  expression is the answer.

All expansions of a level reach the scheduler in one batch (and a leaf's checks too).
The example checks its own answer: an expression that uses each number once and that the
calculator evaluates to exactly 24.

    python examples/tree_search.py                          # embedded default engine
    python examples/tree_search.py --numbers 1,5,5,5 --width 4
    python examples/tree_search.py --url http://127.0.0.1:30080
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from itertools import combinations
from typing import Any

from frontend_lang import (
    Branch,
    ProgramResult,
    Runtime,
    SemanticVariable,
    assistant,
    fork,
    program,
    select,
    system,
    tool,
    user,
)
from frontend_lang.cli_support import run_example
from scheduler.tools.builtin import CalculatorError, evaluate_arithmetic

NUMBERS = (2, 3, 4, 6)
TARGET = 24
OPERATORS = ("*", "+", "-", "/")
SYSTEM = (
    f"You solve the {TARGET} game: combine the numbers with + - * / to make exactly "
    f"{TARGET}. Each number is used once. Each step combines two numbers into one."
)

# Scripted replies for the sim engine: at the root the multiplication branch picks
# 4 * 6 = 24, below it the subtraction branch 3 - 2 = 1; every other branch gets a
# seeded pick among its choices, so the verifier has dead ends to reject.
SCRIPT = [
    {"pattern": r"Numbers: 2, 3, 4, 6\. Choose the next step\.<\|im_end\|>\n"
     r"<\|im_start\|>assistant\n\Z", "reply": "4 * 6 = 24"},
    {"pattern": r"Numbers: 2, 3, 24\. Choose the next step\.<\|im_end\|>\n"
     r"<\|im_start\|>assistant\n\Z", "reply": "3 - 2 = 1"},
]


@dataclass(frozen=True, slots=True)
class Item:
    value: Fraction
    expression: str  # how it was made from the original numbers


@dataclass(slots=True)
class Node:
    items: list[Item]
    conversation: Branch | None  # None at the root (its messages are built on expansion)
    steps: list[str]


def show(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(value)


def steps_with(items: list[Item], operator: str) -> dict[str, list[Item]]:
    """The legal steps with `operator` ("4 * 6 = 24" -> the numbers left after it): no
    negative results, no fractions."""
    out: dict[str, list[Item]] = {}
    for (i, a), (j, b) in combinations(enumerate(items), 2):
        pairs = [(a, b)] if operator in "*+" else [(a, b), (b, a)]
        for x, y in pairs:
            value = _apply(x.value, operator, y.value)
            if value is None or value < 0 or value.denominator != 1:
                continue
            label = f"{show(x.value)} {operator} {show(y.value)} = {show(value)}"
            rest = [item for k, item in enumerate(items) if k not in (i, j)]
            out.setdefault(label, [*rest, Item(value, f"({x.expression} {operator} "
                                                      f"{y.expression})")])
    return out


def _apply(x: Fraction, operator: str, y: Fraction) -> Fraction | None:
    if operator == "/":
        return x / y if y else None
    return {"*": x * y, "+": x + y, "-": x - y}[operator]


def _prompt(items: list[Item]) -> str:
    return f"Numbers: {', '.join(show(item.value) for item in items)}. Choose the next step."


def expand(node: Node, width: int) -> list[tuple[Node, SemanticVariable, dict]]:
    """Fork the node's conversation, one branch per operator with a legal step; in each the
    model picks its step (not awaited: a level's expansions go out together)."""
    operators = [op for op in OPERATORS[:width] if steps_with(node.items, op)]
    if node.conversation is None:
        prefix: Any = [system(SYSTEM), user(_prompt(node.items))]
        branches = fork(len(operators), prefix) if operators else []
    else:
        node.conversation += user(_prompt(node.items))
        branches = node.conversation.fork(len(operators)) if operators else []
    children = []
    for branch, operator in zip(branches, operators, strict=True):
        options = steps_with(node.items, operator)
        branch += assistant(select(choices=list(options), name="step"))
        children.append((Node([], branch, node.steps), branch["step"], options))
    return children


async def verified(leaf: Node) -> str | None:
    """The expression that finishes a two-number leaf at the target, if one does: every
    way to combine the two, each evaluated by the calculator tool (in parallel)."""
    a, b = leaf.items
    candidates = [f"{x.expression} {op} {y.expression}" for op in OPERATORS
                  for x, y in ([(a, b)] if op in "*+" else [(a, b), (b, a)])]
    values = [tool("calculator", expression=expr, name="check") for expr in candidates]
    for expression, value in zip(candidates, values, strict=True):
        if _equals(await value, TARGET):
            return expression
    return None


@program
async def tree_search(numbers: tuple[int, ...] = NUMBERS, width: int = 4,
                      depth: int = 2) -> dict[str, Any]:
    frontier = [Node([Item(Fraction(n), str(n)) for n in numbers], None, [])]
    for _ in range(min(depth, len(numbers) - 2)):
        expansions = [child for node in frontier for child in expand(node, width)]
        frontier = []
        for child, step, options in expansions:
            label = await step
            child.items = options[label]
            child.steps = [*child.steps, label]
            frontier.append(child)
    leaves = [leaf for leaf in frontier if len(leaf.items) == 2]
    for tried, leaf in enumerate(leaves, 1):  # the model's order: the first verified wins
        if expression := await verified(leaf):
            return {"answer": f"{expression} = {TARGET}", "steps": leaf.steps,
                    "leaves_verified": tried, "leaves": len(leaves)}
    return {"answer": "no verified expression", "steps": [], "leaves_verified": len(leaves),
            "leaves": len(leaves)}


def _equals(calculated: str, target: int) -> bool:
    try:
        return abs(float(calculated) - target) < 1e-9
    except ValueError:
        return False


def check(answer: str, numbers: tuple[int, ...]) -> dict[str, Any]:
    """Passed when the answer is an expression that uses each number once and evaluates
    to exactly 24 (recomputed here with the calculator's evaluator)."""
    expected = (f"an expression over {', '.join(map(str, numbers))}, each used once, "
                f"that evaluates to {TARGET}")
    expression = answer.rsplit("=", 1)[0]
    used = sorted(int(n) for n in re.findall(r"\d+", expression))
    try:
        value = evaluate_arithmetic(expression)
    except CalculatorError as exc:
        return {"passed": False, "expected": expected, "why": str(exc)}
    passed = used == sorted(numbers) and abs(value - TARGET) < 1e-9
    result: dict[str, Any] = {"passed": passed, "expected": expected}
    if not passed:
        result["why"] = f"{answer!r} uses {used} and evaluates to {value}"
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--numbers", default=",".join(map(str, NUMBERS)),
                        help="four numbers, comma-separated")
    parser.add_argument("--width", type=int, default=4, help="branches per node (operators)")
    parser.add_argument("--depth", type=int, default=2, help="model-chosen steps per path")


async def main(runtime: Runtime, args: argparse.Namespace) -> ProgramResult[dict]:
    numbers = tuple(int(n) for n in args.numbers.split(","))
    result = await tree_search.run(runtime, numbers, args.width, args.depth)
    result.check = check(result.value["answer"], numbers)
    return result


if __name__ == "__main__":
    sys.exit(run_example(main, script=SCRIPT, doc=__doc__, add_arguments=add_arguments))
