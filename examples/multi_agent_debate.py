"""Multi-agent debate (Du et al., 2023): several agents answer, read each other's answers,
and revise over a few rounds; a judge gives the verdict.

Every agent's prompt starts with the same long system prompt (the debate rules and the
background material): `fork` prefills it once, and the engine's prefix cache serves it to
all agents in all rounds; each agent's context only grows, so a round also reuses the
agent's previous rounds. The report's cached tokens show the reuse. The program awaits nothing until the
verdict, so the whole debate graph (agents x rounds + judge) reaches the scheduler in
one batch, and each round starts the moment the previous one ends.

    python examples/multi_agent_debate.py                      # embedded default engine
    python examples/multi_agent_debate.py --agents 4 --rounds 3
    python examples/multi_agent_debate.py --url http://127.0.0.1:30080
"""

from __future__ import annotations

import argparse
import sys

from frontend_lang import ProgramResult, Runtime, fork, gen, program
from frontend_lang.cli_support import run_example

QUESTION = "Should an LLM serving system schedule whole agent programs or single requests?"
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
    "You take part in a structured debate. Rules: be concise (two sentences), address the "
    "strongest opposing point, and change your position only for a good reason.\n\n"
    + BACKGROUND
    * 3
)

SCRIPT = [
    {
        "pattern": r"Verdict:\Z",
        "reply": "Schedule programs: the agents agree that program-level priorities and "
        "prefix reuse cut waiting, provided single requests are not starved.",
    },
    {
        "pattern": r"You are agent (\d+)\b.*round (\d+)\. Your answer:\Z",
        "reply": r"Agent \1, round \2: schedule whole programs, because the scheduler then "
        r"sees dependencies and keeps prefixes cached; single-request fairness must stay.",
    },
]


@program
async def debate(question: str, agents: int = 3, rounds: int = 2) -> str:
    # One branch per agent from the shared system prompt: `fork` prefills it once, and
    # each agent's context then only grows, so every round reuses all of the last one.
    seats = fork(agents, f"{SYSTEM}\nQuestion: {question}\n")
    for seat in seats:
        seat += f"You are agent {seat.index + 1}, {PERSONAS[seat.index % len(PERSONAS)]}.\n"
    transcript = ""
    for round_index in range(1, rounds + 1):
        previous = [seat.last for seat in seats]
        for seat in seats:
            if round_index > 1:
                seat += "The other agents said:\n" + "".join(
                    f"Agent {j + 1}: {answer}\n"
                    for j, answer in enumerate(previous)
                    if j != seat.index
                )
            seat += f"This is round {round_index}. Your answer:"
            seat.gen(max_tokens=48, temperature=0, name=f"round{round_index}_agent{seat.index + 1}")
        # Variables, not values: the next round's prompts depend on these calls.
        transcript += "".join(
            f"Agent {seat.index + 1} (round {round_index}): {seat.last}\n" for seat in seats
        )
    verdict = gen(
        f"{SYSTEM}\nQuestion: {question}\nYou are the judge.\n{transcript}Verdict:",
        max_tokens=48,
        temperature=0,
        name="verdict",
    )
    return await verdict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)


async def main(runtime: Runtime, args: argparse.Namespace) -> ProgramResult[str]:
    return await debate.run(runtime, args.question, args.agents, args.rounds)


if __name__ == "__main__":
    sys.exit(run_example(main, script=SCRIPT, doc=__doc__, add_arguments=add_arguments))
