"""Synthetic agent workloads for the policy benchmark, generated from published statistics.

A trace is a list of program *shapes*: only numbers (lengths, fan-outs, tool latencies),
drawn once from the seed. Prompts are built while the program runs, from shared segments
(system prompts, few-shot examples, function docs), fresh per-program content and the
engine's actual outputs, so prefix sharing is exactly what a real agent would send.
Arrivals are a Poisson process: unit-rate gaps are drawn once and divided by the rate, so
every rate (and every policy) sees the same programs in the same order.

Parameters (means; lengths are log-normal around them unless said otherwise):

chat (ShareGPT-like multi-turn conversations)
- turns per conversation: geometric, mean 6.7 (the issue's figure; ShareGPT conversations
  are heavy-tailed), capped at 30.
- user turn: 100 tokens; reply: 300 tokens, capped at 1,024 (vLLM's ShareGPT statistics:
  mean input 161, mean output 338 tokens per request).
- a 60-token system prompt shared by all conversations; no think time between turns (the
  client sends the next turn when the reply ends).

bfcl (Berkeley Function Calling Leaderboard, multi-turn / multi-step)
- calls per program: 2 + Poisson(8.75), mean 10.75.
- prompt: a 100-token system header shared by all, one of 40 function-doc sets of ~280
  tokens (shared by the programs that draw it), a 50-token user query; every step appends
  the call's output and the tool's result (30 tokens). Mean prompt ~735 tokens.
- output per call: 34 tokens (function call JSON); tool latency 1.0 s (an API call).

lats (Language Agent Tree Search on HotpotQA, n = 5 children per expansion)
- iterations: uniform 12..20 (mean 16); each expands one node into 5 children (5 parallel
  generate calls on the same prompt, 60 output tokens each), runs the 5 actions (a
  Wikipedia lookup, 0.5 s, 120-token observation) and evaluates the 5 children (5
  parallel value calls, 24 output tokens); one final answer call: ~161 calls.
- prompts: a 1,200-token few-shot prefix for generation and a 600-token one for
  evaluation, shared by every LATS program, then the question (60 tokens) and the
  node's trajectory (its ancestors' thoughts, actions and observations).
- selection: with probability 0.6 the best child of the last expansion (deepening),
  otherwise a random earlier node; depth is capped at 7.

mapreduce (Parrot's map-reduce summarisation)
- chunks: uniform 8..16; map prompt: an 80-token instruction (shared) plus a 1,000-token
  chunk, 80 output tokens; reduce prompt: an instruction plus every map output, 250
  output tokens. Maps run in parallel, the reduce waits for all of them.

swe (SWE-agent-style coding agents on SWE-bench issues: a chain of tens of turns whose
context grows to tens of thousands of tokens, with tool gaps of seconds to tens of seconds)
- turns: 4 + geometric(mean 20), so at least 5, capped at 60 (mean ~24 drawn; the
  context limit below ends the longest ones, leaving a mean of ~18 and a max of ~37). Published trajectories: a median
  of 8 turns / 15 tool calls over 973 sessions of 8 agents (xor.tech "Execution Metrics"),
  "some agents solve bugs in 5 turns, others take 60+"; SWE-agent's own runs stop at a
  cost budget ($4 per instance, Yang et al. 2024, arXiv 2405.15793), which lets a
  GPT-4-class agent run tens of steps; we take the upper half (tens of turns) because long
  trajectories are the ones that hold KV.
- prompt: a 3,000-token system prompt with the tool (ACI) docs and one demonstration,
  shared by every program (SWE-agent's default config sends its command docs and a
  demonstration trajectory first; an estimate of their length), then the issue: 260 tokens
  (SWE-bench, Jimenez et al. 2024: issue text 195 words on average, ~1.33 tokens/word).
- per turn: 250 output tokens (a thought and one command), then the command's
  observation: 600 tokens, capped at 4,000 (file-viewer windows of 100 lines, grep and
  test output). With ~25 turns the context grows from ~3.3k to ~24k tokens and one
  attempt sends ~300k input tokens in all, in line with the ~250,000 input tokens per
  SWE-bench Verified attempt from published traces (holyai.me "solve tax") and with
  successful mini-SWE-agent trajectories staying under ~20k tokens while longer ones
  run on (Raju et al. 2026, arXiv 2602.16069). A trajectory stops once its context would
  pass 28,000 tokens (the sim's 32k context, less room for a reply), as SWE-agent stops
  at its context limit.
- tool latency: 2 s mean (an edit, a file view, a grep); with probability 0.2 the command
  runs tests or a build: 20 s mean. Both log-normal.
- KV capacity: `SWE_KV_CAPACITY` = 470,000 tokens per replica (Llama-3-8B bf16 on one
  80 GB H100: ~16 GB weights and ~2.5 GB activations leave ~61.5 GB, at 128 KiB of KV
  per token), unless `--kv-capacity` says otherwise. The working set (programs in
  their tool gaps keep 10-25k tokens each) outgrows it at about half a program per
  second on 4 replicas, before compute does.

mixed: equal parts chat, bfcl and lats, interleaved at random. Other mixes: `mix`, a
weight per program type (`parse_mix("chat=2,bfcl=1,lats=1,mapreduce=1")`); each type gets
its share of the programs (smooth weighted round robin, then a seeded shuffle), so the
default mix gives the same trace as equal weights always did.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal

WorkloadName = Literal["chat", "bfcl", "lats", "mapreduce", "swe", "mixed"]
WORKLOADS: tuple[str, ...] = ("chat", "bfcl", "lats", "mapreduce", "swe", "mixed")
PROGRAM_TYPES: tuple[str, ...] = ("chat", "bfcl", "lats", "mapreduce", "swe")
# KV tokens per replica of the modelled hardware (Llama-3-8B bf16, one H100): the swe
# workload's default capacity, where KV binds by nature (see the docstring).
SWE_KV_CAPACITY = 470_000

# Token-id space: shared segments live below SHARED_SPACE; program i's fresh content
# starts at SHARED_SPACE + i * PROGRAM_SPACE (ids are arbitrary: the sim engine accepts any
# non-negative id, and distinct ids mean distinct content).
SHARED_SPACE = 10_000_000
PROGRAM_SPACE = 1_000_000


@dataclass(frozen=True, slots=True)
class WorkloadParams:
    # chat
    chat_turns_mean: float = 6.7
    chat_turns_max: int = 30
    chat_user_tokens: float = 100.0
    chat_reply_tokens: float = 300.0
    chat_reply_max: int = 1024
    chat_system_tokens: int = 60
    # bfcl
    bfcl_extra_calls_mean: float = 8.75  # calls = 2 + Poisson(this)
    bfcl_header_tokens: int = 100
    bfcl_doc_sets: int = 40
    bfcl_doc_tokens: float = 280.0
    bfcl_query_tokens: float = 50.0
    bfcl_output_tokens: float = 34.0
    bfcl_result_tokens: float = 30.0
    bfcl_tool_latency_s: float = 1.0
    # lats
    lats_iterations: tuple[int, int] = (12, 20)
    lats_children: int = 5
    lats_gen_prefix_tokens: int = 1200
    lats_value_prefix_tokens: int = 600
    lats_question_tokens: float = 60.0
    lats_gen_tokens: float = 60.0
    lats_obs_tokens: float = 120.0
    lats_value_tokens: float = 24.0
    lats_answer_tokens: float = 40.0
    lats_tool_latency_s: float = 0.5
    lats_deepen_prob: float = 0.6
    lats_max_depth: int = 7
    # mapreduce
    mr_chunks: tuple[int, int] = (8, 16)
    mr_instruction_tokens: int = 80
    mr_chunk_tokens: float = 1000.0
    mr_map_tokens: float = 80.0
    mr_reduce_tokens: float = 250.0
    # swe
    swe_min_turns: int = 5
    swe_extra_turns_mean: float = 20.0  # turns = min_turns + geometric(this), capped
    swe_max_turns: int = 60
    swe_system_tokens: int = 3000
    swe_issue_tokens: float = 260.0
    swe_output_tokens: float = 250.0
    swe_output_max: int = 1024
    swe_observation_tokens: float = 600.0
    swe_observation_max: int = 4000
    swe_tool_latency_s: float = 2.0
    swe_test_prob: float = 0.2
    swe_test_latency_s: float = 20.0
    swe_context_limit: int = 28_000
    # shapes of the log-normal draws
    length_sigma: float = 0.6
    latency_sigma: float = 0.8


@dataclass(slots=True)
class ChatShape:
    turns: list[tuple[int, int]]  # (user tokens, reply tokens)


@dataclass(slots=True)
class BfclShape:
    doc_set: int
    query_tokens: int
    steps: list[tuple[int, float, int]]  # (output tokens, tool latency, result tokens)


@dataclass(slots=True)
class LatsIteration:
    parent: int  # index of the node to expand (0 = root); resolved at run time
    deepen: bool  # expand the best child of the previous expansion instead
    gen_tokens: list[int]
    obs_tokens: list[int]
    tool_latency: list[float]
    value_tokens: list[int]


@dataclass(slots=True)
class LatsShape:
    question_tokens: int
    iterations: list[LatsIteration]
    answer_tokens: int


@dataclass(slots=True)
class MapReduceShape:
    chunks: list[tuple[int, int]]  # (chunk tokens, map output tokens)
    reduce_tokens: int


@dataclass(slots=True)
class SweShape:
    issue_tokens: int
    steps: list[tuple[int, float, int]]  # (output tokens, tool latency, observation tokens)


Shape = ChatShape | BfclShape | LatsShape | MapReduceShape | SweShape


@dataclass(slots=True)
class ProgramTrace:
    index: int
    kind: str
    unit_arrival: float  # arrival time at rate 1 program/s
    shape: Shape
    id: str = ""

    def __post_init__(self) -> None:
        self.id = f"{self.kind}-{self.index}"

    @property
    def token_base(self) -> int:
        return SHARED_SPACE + self.index * PROGRAM_SPACE


@dataclass(slots=True)
class Trace:
    workload: str
    seed: int
    params: WorkloadParams
    programs: list[ProgramTrace] = field(default_factory=list)

    def arrivals(self, rate: float) -> list[float]:
        return [p.unit_arrival / rate for p in self.programs]

    def calls(self) -> int:
        return sum(count_calls(p.shape) for p in self.programs)


def count_calls(shape: Shape) -> int:
    if isinstance(shape, ChatShape):
        return len(shape.turns)
    if isinstance(shape, BfclShape):
        return len(shape.steps)
    if isinstance(shape, LatsShape):
        return sum(2 * len(it.gen_tokens) for it in shape.iterations) + 1
    if isinstance(shape, SweShape):
        return len(shape.steps)
    return len(shape.chunks) + 1


class _Draw:
    """Seeded draws of the distributions above."""

    def __init__(self, rng: random.Random, params: WorkloadParams) -> None:
        self.rng = rng
        self.params = params

    def length(self, mean: float, cap: int = 1 << 20) -> int:
        sigma = self.params.length_sigma
        mu = math.log(mean) - sigma * sigma / 2  # so that the mean is `mean`
        return max(1, min(cap, round(self.rng.lognormvariate(mu, sigma))))

    def latency(self, mean: float) -> float:
        sigma = self.params.latency_sigma
        mu = math.log(mean) - sigma * sigma / 2
        return self.rng.lognormvariate(mu, sigma)

    def geometric(self, mean: float, cap: int) -> int:
        p = 1.0 / mean
        n = 1 + int(math.log(1.0 - self.rng.random()) / math.log(1.0 - p))
        return min(n, cap)

    def poisson(self, lam: float) -> int:
        # Knuth's method: fine for the small means used here.
        limit, k, prod = math.exp(-lam), 0, self.rng.random()
        while prod > limit:
            k += 1
            prod *= self.rng.random()
        return k


def _chat(d: _Draw) -> ChatShape:
    p = d.params
    turns = d.geometric(p.chat_turns_mean, p.chat_turns_max)
    return ChatShape(
        [(d.length(p.chat_user_tokens), d.length(p.chat_reply_tokens, p.chat_reply_max))
         for _ in range(turns)]
    )


def _bfcl(d: _Draw) -> BfclShape:
    p = d.params
    calls = 2 + d.poisson(p.bfcl_extra_calls_mean)
    return BfclShape(
        doc_set=d.rng.randrange(p.bfcl_doc_sets),
        query_tokens=d.length(p.bfcl_query_tokens),
        steps=[
            (d.length(p.bfcl_output_tokens, 256), d.latency(p.bfcl_tool_latency_s),
             d.length(p.bfcl_result_tokens))
            for _ in range(calls)
        ],
    )


def _lats(d: _Draw) -> LatsShape:
    p = d.params
    n = p.lats_children
    iterations = []
    for i in range(d.rng.randint(*p.lats_iterations)):
        iterations.append(
            LatsIteration(
                parent=d.rng.randrange(1 + i * n),
                deepen=i > 0 and d.rng.random() < p.lats_deepen_prob,
                gen_tokens=[d.length(p.lats_gen_tokens, 256) for _ in range(n)],
                obs_tokens=[d.length(p.lats_obs_tokens, 512) for _ in range(n)],
                tool_latency=[d.latency(p.lats_tool_latency_s) for _ in range(n)],
                value_tokens=[d.length(p.lats_value_tokens, 64) for _ in range(n)],
            )
        )
    return LatsShape(d.length(p.lats_question_tokens), iterations, d.length(p.lats_answer_tokens))


def _mapreduce(d: _Draw) -> MapReduceShape:
    p = d.params
    chunks = d.rng.randint(*p.mr_chunks)
    return MapReduceShape(
        [(d.length(p.mr_chunk_tokens, 2000), d.length(p.mr_map_tokens, 256))
         for _ in range(chunks)],
        d.length(p.mr_reduce_tokens, 1024),
    )


def _swe(d: _Draw) -> SweShape:
    p = d.params
    turns = min(p.swe_max_turns, p.swe_min_turns - 1
                + d.geometric(p.swe_extra_turns_mean, p.swe_max_turns))
    issue = d.length(p.swe_issue_tokens)
    context = p.swe_system_tokens + issue
    steps = []
    for _ in range(turns):
        out = d.length(p.swe_output_tokens, p.swe_output_max)
        test = d.rng.random() < p.swe_test_prob
        latency = d.latency(p.swe_test_latency_s if test else p.swe_tool_latency_s)
        observation = d.length(p.swe_observation_tokens, p.swe_observation_max)
        if context + out + p.swe_output_max > p.swe_context_limit and steps:
            break  # the agent stops at its context limit
        steps.append((out, latency, observation))
        context += out + observation
    return SweShape(issue, steps)


def swe_contexts(shape: SweShape, params: WorkloadParams) -> list[int]:
    """The prompt length of each turn of a swe program (what the statistics test reads)."""
    context = params.swe_system_tokens + shape.issue_tokens
    lengths = []
    for out, _, observation in shape.steps:
        lengths.append(context)
        context += out + observation
    return lengths


_MAKERS = {"chat": _chat, "bfcl": _bfcl, "lats": _lats, "mapreduce": _mapreduce, "swe": _swe}
MIXED_TYPES = ("chat", "bfcl", "lats")
DEFAULT_MIX: tuple[tuple[str, float], ...] = tuple((kind, 1.0) for kind in MIXED_TYPES)

Mix = tuple[tuple[str, float], ...]  # (program type, weight), in a fixed order


def parse_mix(text: str) -> Mix:
    """`"chat=2,bfcl=1,lats=1"` -> weights per program type (a bare name weighs 1)."""
    weights: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in PROGRAM_TYPES:
            raise ValueError(f"unknown program type {name!r} in the mix "
                             f"(known: {', '.join(PROGRAM_TYPES)})")
        if name in weights:
            raise ValueError(f"program type {name!r} appears twice in the mix")
        try:
            weight = float(value) if value.strip() else 1.0
        except ValueError:
            raise ValueError(f"weight of {name!r} is not a number: {value!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {value!r}")
        weights[name] = weight
    if not weights or sum(weights.values()) <= 0:
        raise ValueError("the mix needs at least one program type with a weight above 0")
    return tuple(weights.items())


def mix_kinds(mix: Mix, programs: int) -> list[str]:
    """Program types in smooth weighted round-robin order: every prefix of the list holds
    each type in proportion to its weight (equal weights: a, b, c, a, b, c, ...)."""
    total = sum(w for _, w in mix)
    current = [0.0] * len(mix)
    kinds = []
    for _ in range(programs):
        for i, (_, weight) in enumerate(mix):
            current[i] += weight
        best = max(range(len(mix)), key=current.__getitem__)  # first on ties
        current[best] -= total
        kinds.append(mix[best][0])
    return kinds


def generate_trace(
    workload: str, programs: int, seed: int, params: WorkloadParams | None = None,
    *, mix: Mix | None = None,
) -> Trace:
    """`programs` program shapes and unit-rate Poisson arrivals, deterministic in `seed`.
    `mix` (only for `mixed`) weighs the program types; default: chat, bfcl, lats equally."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r} (known: {', '.join(WORKLOADS)})")
    if mix is not None and workload != "mixed":
        raise ValueError(f"a mix applies to the mixed workload, not to {workload!r}")
    params = params or WorkloadParams()
    rng = random.Random(f"progserve-bench/{workload}/{seed}")
    draw = _Draw(rng, params)
    if workload == "mixed":
        kinds = mix_kinds(mix or DEFAULT_MIX, programs)
        rng.shuffle(kinds)
    else:
        kinds = [workload] * programs
    trace = Trace(workload, seed, params)
    t = 0.0
    for index, kind in enumerate(kinds):
        t += rng.expovariate(1.0)
        trace.programs.append(ProgramTrace(index, kind, t, _MAKERS[kind](draw)))
    return trace


def shared_segment(name: str, index: int, tokens: int) -> list[int]:
    """A segment shared across programs (system prompts, few-shot examples, docs)."""
    base = (hash_name(name) * 997 + index * 10_007) % (SHARED_SPACE - tokens)
    return list(range(base, base + tokens))


def hash_name(name: str) -> int:
    h = 0
    for ch in name:
        h = (h * 131 + ord(ch)) % 1_000_003
    return h
