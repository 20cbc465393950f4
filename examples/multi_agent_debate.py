"""Multi-agent debate (Du et al., 2023): several agents answer, read each other's answers,
and revise over a few rounds; a judge gives the verdict.

Every agent is a conversation (chat roles, rendered with the model's own template) that
starts from the same long system prompt (the debate rules and the background material):
`fork` prefills it once, and the engine's prefix cache serves it to all agents in all
rounds; each agent's conversation only grows, so a round also reuses the agent's previous
rounds. The report's cached tokens show the reuse. The arguments are free text, asked for
in a form a small model can follow: in the first round each agent argues an assigned side
from a persona in one sentence, in later rounds it names the weakest part of another
agent's argument (arguments are shown up to their last full stop); the verdict is a
constrained `select` between the two positions. The program awaits nothing
until the verdict, so the whole debate graph (agents x rounds + judge) reaches the
scheduler in one batch, and each round starts the moment the previous one ends.

The example checks its own answer: the verdict is one of the positions, and every
argument is plain prose (sentences, no markdown, nothing repeated) on the debate's terms.

    python examples/multi_agent_debate.py                      # embedded default engine
    python examples/multi_agent_debate.py --agents 4 --rounds 3
    python examples/multi_agent_debate.py --url http://127.0.0.1:30080
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from frontend_lang import (
    ProgramResult,
    Runtime,
    assistant,
    fork,
    gen,
    program,
    select,
    system,
    user,
)
from frontend_lang.cli_support import run_example
from frontend_lang.example_checks import complete_sentences, key_terms, prose_problems

QUESTION = "Should an LLM serving system schedule whole agent programs or single requests?"
POSITIONS = ["whole agent programs", "single requests"]
PERSONAS = [
    "a systems researcher who cares about tail latency",
    "an engineer who runs a GPU cluster and cares about throughput",
    "a product lead who cares about what users wait for",
    "a skeptic who asks for evidence",
]
BACKGROUND = """\
Background material (shared by every participant):
An agent run is a program of many LLM calls and tool calls that depend on each other.
Engines such as SGLang and vLLM see only single requests, so a long agent waits behind
short chats, a program's KV cache is evicted while it waits for a tool, and calls that
could run in parallel run one after another. Program-level schedulers (Autellix) rank
calls by the service their program has already received (PLAS, ATLAS), which shortens
programs' response times under load. Parrot exposes the data flow between calls through
semantic variables, so the server sees future calls and can batch and pipeline them.
Prefix caches (RadixAttention) reuse the KV of shared prompt prefixes across requests.
"""
SYSTEM = (
    "You take part in a structured debate. Rules: answer in one plain sentence, address "
    "the strongest opposing point, and change your position only for a good reason.\n\n"
    + BACKGROUND
)
ARGUMENT_TOKENS = 72

# Scripted replies for the sim engine (ChatML turns: the sim engine has no template).
SCRIPT = [
    {
        "pattern": r"Answer with whole agent programs or single requests\.<\|im_end\|>\n"
        r"<\|im_start\|>assistant\n\Z",
        "reply": "whole agent programs",
    },
    {
        "pattern": r"weakest part of that argument\? Answer in one sentence\.<\|im_end\|>\n"
        r"<\|im_start\|>assistant\n\Z",
        "reply": "The weakest part is that it ignores how calls of one program depend on "
        "each other, so a scheduler of single requests cannot keep their prefixes cached.",
    },
    {
        "pattern": r"should schedule ([a-z ]+)\.<\|im_end\|>\n<\|im_start\|>assistant\n\Z",
        "reply": r"A serving system should schedule \1 because that keeps the calls of a "
        r"program together and shortens the time users wait for an answer.",
    },
]


@program
async def debate(question: str, agents: int = 3, rounds: int = 2) -> dict[str, Any]:
    # One branch per agent from the shared system prompt: `fork` prefills it once, and
    # each agent's conversation then only grows, so every round reuses all of the last.
    seats = fork(agents, system(SYSTEM))
    arguments = []
    for round_index in range(1, rounds + 1):
        previous = [seat.last for seat in seats]
        for seat in seats:
            if round_index == 1:  # a side and a persona to argue from
                persona = PERSONAS[seat.index % len(PERSONAS)]
                side = POSITIONS[seat.index % len(POSITIONS)]
                seat += user(f"You are {persona}. In one short sentence, explain why an LLM "
                             f"serving system should schedule {side}.")
            else:  # answer the next agent's last argument
                other = (seat.index + 1) % agents
                seat += user(f"Agent {other + 1} said: {previous[other]}\nWhat is the "
                             f"weakest part of that argument? Answer in one sentence.")
            seat += assistant(gen(max_tokens=ARGUMENT_TOKENS, temperature=0,
                                  name=f"round{round_index}_agent{seat.index + 1}"))
            arguments.append(seat.last)
    # Variables, not values: the judge's prompt depends on the last round's calls.
    transcript = "".join(f"Agent {seat.index + 1}: {seat.last}\n" for seat in seats)
    judge = [system(SYSTEM), user(f"The debate:\n{transcript}\nQuestion: {question}\n"
                                  f"Answer with {POSITIONS[0]} or {POSITIONS[1]}.")]
    verdict = select(judge, POSITIONS, name="verdict")
    return {"answer": await verdict,
            "arguments": [complete_sentences(await a) for a in arguments]}


def check(value: dict[str, Any], question: str) -> dict[str, Any]:
    """The verdict is one of the positions; every argument is plain prose on the debate's
    terms (sentences, no markdown lines, nothing repeated, a key term of the material)."""
    terms = key_terms(question + "\n" + BACKGROUND, 16)
    problems = [] if value["answer"] in POSITIONS else [f"verdict {value['answer']!r}"]
    for i, argument in enumerate(value["arguments"], 1):
        problems += [f"argument {i}: {p}" for p in prose_problems(argument, terms, 1)]
    result: dict[str, Any] = {
        "passed": not problems,
        "expected": f"a verdict in {POSITIONS}; arguments in plain sentences, no markdown, "
        f"nothing repeated, each with a key term of {terms}",
    }
    if problems:
        result["why"] = "; ".join(problems)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)


async def main(runtime: Runtime, args: argparse.Namespace) -> ProgramResult[dict]:
    result = await debate.run(runtime, args.question, args.agents, args.rounds)
    result.check = check(result.value, args.question)
    return result


if __name__ == "__main__":
    sys.exit(run_example(main, script=SCRIPT, doc=__doc__, add_arguments=add_arguments))
