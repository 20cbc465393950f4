"""Tree search (LATS-style, Zhou et al., 2024): expand several candidate next steps per
node, score each with a value prompt, keep the best nodes, repeat, then answer from the
best path.

Per level, every kept node forks `--width` branches (`fork` prefills the node's path once,
so the branches share its KV); each branch writes a step and scores it with a constrained
`select` over 1..10. The program awaits only the scores: the steps stay variables, so a
path is a template of earlier steps that the server fills in, and the expansions and
scores of a level all reach the scheduler in one batch.

    python examples/tree_search.py                          # embedded default engine
    python examples/tree_search.py --width 4 --depth 3 --beam 2
    python examples/tree_search.py --url http://127.0.0.1:30080
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from frontend_lang import ProgramResult, Runtime, SemanticVariable, fork, gen, program, select
from frontend_lang.cli_support import run_example

PROBLEM = "Use the numbers 2, 3, 4 and 6 once each, with + - * and /, to make 24."
SCORES = [str(n) for n in range(1, 11)]

# Scripted replies for the sim engine: a step depends on the branch and the path so far,
# and a step's score on the step, so the search has something to choose between.
SCRIPT = [
    {"pattern": r"Final answer:\Z", "reply": " (3 - 2) * 4 * 6 = 24"},
    {"pattern": r"= 24[^\n]*\nHow promising[^\n]*\Z", "reply": "10"},
    {"pattern": r"3 - 2 = 1[^\n]*\nHow promising[^\n]*\Z", "reply": "8"},
    {"pattern": r"How promising[^\n]*\Z", "reply": "4"},
    {"pattern": r"Problem: [^\n]*\nCandidate 0\. Step:\Z", "reply": " 3 - 2 = 1 (left: 1, 4, 6)"},
    {"pattern": r"Problem: [^\n]*\nCandidate 1\. Step:\Z", "reply": " 2 + 3 = 5 (left: 5, 4, 6)"},
    {"pattern": r"Problem: [^\n]*\nCandidate \d+\. Step:\Z", "reply": " 6 / 2 = 3 (left: 3, 3, 4)"},
    {"pattern": r"3 - 2 = 1[^\n]*\nCandidate 0\. Step:\Z", "reply": " 4 * 6 = 24 (left: 1, 24)"},
    {"pattern": r"3 - 2 = 1[^\n]*\nCandidate \d+\. Step:\Z", "reply": " 1 + 4 = 5 (left: 5, 6)"},
    {"pattern": r"Candidate \d+\. Step:\Z", "reply": " 5 * 4 = 20 (left: 20, 6)"},
]


@program
async def tree_search(problem: str, width: int = 3, depth: int = 2, beam: int = 2) -> dict:
    root = f"Solve step by step.\nProblem: {problem}\n"
    frontier: list[Node] = [Node(root, [], 0)]
    for _ in range(depth):
        candidates: list[tuple[Node, SemanticVariable]] = []
        for node in frontier:
            for branch in fork(width, node.path):
                branch += f"Candidate {branch.index}. Step:"
                step = branch.gen(max_tokens=32, stop="\n", temperature=0.8, name="step")
                score = select(
                    f"{node.path}Step: {step}\nHow promising is this step, from 1 to 10?",
                    SCORES,
                    name="score",
                )
                child = Node(f"{node.path}Step: {step}\n", [*node.steps, step], 0)
                candidates.append((child, score))
        for child, score in candidates:  # the only values the search needs
            child.score = int(await score)
        candidates.sort(key=lambda item: -item[0].score)
        frontier = [child for child, _ in candidates[:beam]]
    best = frontier[0]
    answer = gen(best.path + "Final answer:", max_tokens=48, temperature=0, name="answer")
    return {
        "answer": await answer,
        "steps": [await step for step in best.steps],
        "score": best.score,
    }


@dataclass(slots=True)
class Node:
    path: str  # a template over the steps' variables
    steps: list[SemanticVariable]
    score: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--problem", default=PROBLEM)
    parser.add_argument("--width", type=int, default=3, help="branches per node")
    parser.add_argument("--depth", type=int, default=2, help="levels")
    parser.add_argument("--beam", type=int, default=2, help="nodes kept per level")


async def main(runtime: Runtime, args: argparse.Namespace) -> ProgramResult[dict]:
    return await tree_search.run(runtime, args.problem, args.width, args.depth, args.beam)


if __name__ == "__main__":
    sys.exit(run_example(main, script=SCRIPT, doc=__doc__, add_arguments=add_arguments))
