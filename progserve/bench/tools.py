"""Tool benchmarks on the sim engine: parallel function calls and partial tool execution.

`--mode parallel` (LLMCompiler vs ReAct). ParallelQA-like questions: "what is the total
<attribute> of E1..Ek" with k = 2..6 independent searches of 0.2-1.0 s each, then a
combining calculator step. Every question runs twice in the same run, each side on its
own sim engine of the same configuration:
- sequential (ReAct): one LLM step per action (thought + `Action: tool(args)`), each tool
  run after its step, observations appended to the context, a final answer step;
- parallel (LLMCompiler): one planner call whose streamed plan adds each task to the
  program's graph on the scheduler (`scheduler.tools.llmcompiler.submit_plan`: tasks
  start while the plan is still being written, each when its `$k` inputs are done), then
  one joiner call. Both sides' LLM calls go through the scheduler, as on the server.
The model's text comes from the sim engine's scripted responder; its timing from the
engine's cost model (Llama-3-8B on an H100). Tools are real `ToolExecutor` calls
(the searches sleep for their latency with `asyncio.sleep`; the calculator computes the
sum from the search results through `$k` references, and is checked).
`ideal_speedup` uses the critical path of each question's plan: every task starts the
moment its plan line was streamed and its inputs are ready, with zero dispatch overhead;
the joiner then takes the time it measured. So `speedup / ideal_speedup` is the share of
the ideal that the scheduler's graph reaches.

`--mode partial` (Conveyor). Three workloads where tool time is comparable to decode time:
- code: the model writes a Python script (CodeAct style, in a fence) whose statements
  each take about as long to run as the next one takes to decode; run by the sandboxed
  code-runner tool (a real child process);
- search: a search tool with several arguments; each argument's lookup (0.5-1.5x its
  decode time) starts as soon as that argument is written;
- plan: a multi-step plan whose steps are validated in order, each check taking about as
  long as a step takes to decode.
Each instance runs without partial execution (the tool gets its whole input after
decoding, the conventional order) and with it (each part is fed as soon as it is
complete), on two engines of the same configuration. Completion latency is from the
request to the tool's result. The top-level `latency_reduction` is the code workload's
(when run), as in Conveyor's headline; every workload's is under `workloads`.

Clock: `--clock real` (the default) runs on the normal event loop in real time, with the
engine's `time_scale` and every tool duration compressed by the same factor; measured
times are real elapsed seconds. `--clock virtual` (parallel mode only) runs the same code
on the virtual-time loop (`engine_backend.virtual_time`): exact, and without the
machine's own overheads. Partial mode is always real time (it runs child processes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine_backend.sim.config import SimConfig
from engine_backend.sim.engine import SimEngine
from engine_backend.sim.responders import ReplyBuilder, ScriptedResponder
from engine_backend.sim.tokenizer import SimTokenizer
from engine_backend.types import GenerateRequest, SamplingParams
from engine_backend.virtual_time import run_virtual
from scheduler.config import SchedulerConfig
from scheduler.scheduler import Scheduler
from scheduler.spec import CallSpec, ProgramSpec
from scheduler.tools import CodeRunnerConfig, ToolExecutor, ToolRegistry, ToolsConfig
from scheduler.tools.builtin import MultiFieldSearch, PlanValidator, SimulatedSearch, calculator
from scheduler.tools.code_runner import CodeRunnerTool
from scheduler.tools.llmcompiler import (
    PlanSubmission,
    parse_call,
    parse_joiner_output,
    scratchpad_template,
    submit_plan,
    task_variable,
)
from scheduler.tools.partial import CodeStatementStream, JsonArgumentStream, run_partial_tool

ENTITIES = (
    "Paris", "Rome", "Berlin", "Madrid", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo",
    "Warsaw", "Athens", "Helsinki", "Lyon", "Porto", "Munich", "Zurich", "Krakow", "Seville",
)  # fmt: skip
ATTRIBUTES = ("population", "area in square km", "elevation in m", "number of museums")
PLANNER_SYSTEM = (
    "You are a planner. Split the question into tool calls that can run in parallel. "
    "Tools: search(query) returns one number; calculator(expression) evaluates arithmetic; "
    "join() ends the plan. Write `N. tool(args)` lines, use $N for earlier results, "
    "and end with join()<END_OF_PLAN>.\n"
)
JOINER_SYSTEM = (
    "You are the joiner. Read the observations and answer with `Thought:` and "
    "`Action: Finish(answer)`, or `Action: Replan(reason)` when information is missing.\n"
)
REACT_SYSTEM = (
    "Answer the question step by step. Each step is a thought and one action: "
    "search(query), calculator(expression) or Finish(answer). You see each observation "
    "before the next step.\n"
)
SAMPLING = SamplingParams(max_new_tokens=1024, temperature=0.0)
TOKEN_SECONDS = 0.0072  # the sim's single-stream decode step (for sizing workloads only)


# -- engines and LLM calls --------------------------------------------------------------------


class ScriptedLLM:
    """A sim engine behind the scheduler, as the server runs it; its replies are looked up
    by the cue that ends each prompt. Tool calls of its graph programs go to each
    program's own executor (`executors`, by program id)."""

    def __init__(self, time_scale: float, seed: int) -> None:
        tokenizer = SimTokenizer()
        self.replies: dict[str, str] = {}
        responder = ScriptedResponder(ReplyBuilder(tokenizer, seed))
        responder.add(r"\[(?P<cue>[\w:.-]+)\]\s*\Z", self._reply)
        config = SimConfig(time_scale=time_scale, stream_interval=1, seed=seed)
        self.engine = SimEngine(config, responder=responder, tokenizer=tokenizer)
        self.executors: dict[str, ToolExecutor] = {}
        self.scheduler = Scheduler([self.engine], SchedulerConfig(), tools=self)
        self._rids = 0

    def _reply(self, match: re.Match[str]) -> str:
        return self.replies[match.group("cue")]

    def run(self, name: str, args: dict[str, Any], *, program_id: str, call_id: str) -> Any:
        """The scheduler's tool runner: the program's own tools."""
        return self.executors[program_id].run(name, args, program_id=program_id,
                                              call_id=call_id)

    async def start(self) -> ScriptedLLM:
        await self.scheduler.start()
        return self

    async def close(self) -> None:
        await self.scheduler.close()  # and its engine

    async def stream(self, prompt: str, *, program_id: str) -> AsyncIterator[str]:
        """One LLM call of the program, through the scheduler's queue."""
        self._rids += 1
        request = GenerateRequest(
            rid=f"{program_id}-{self._rids}",
            text=prompt,
            sampling=SAMPLING,
            program_id=program_id,
        )
        await self.scheduler.open_program(program_id)
        async with aclosing(self.scheduler.llm_call(program_id, request)) as chunks:
            async for chunk in chunks:
                if chunk.text:
                    yield chunk.text

    async def complete(self, prompt: str, *, program_id: str) -> str:
        return "".join([d async for d in self.stream(prompt, program_id=program_id)])

    async def end(self, program_id: str) -> None:
        await self.scheduler.end_program(program_id)


def tokens_of(text: str) -> int:
    return len(SimTokenizer.split(text))


# -- parallel mode: workload ---------------------------------------------------------------


@dataclass(slots=True)
class Question:
    qid: int
    attribute: str
    entities: list[str]
    latencies: list[float]  # model seconds (before time scaling)
    values: list[int]

    @property
    def k(self) -> int:
        return len(self.entities)

    @property
    def text(self) -> str:
        return f"What is the total {self.attribute} of {', '.join(self.entities)}?"

    def query(self, i: int) -> str:
        return f"{self.attribute} of {self.entities[i]}"

    @property
    def answer(self) -> int:
        return sum(self.values)

    def plan(self) -> str:
        lines = ["Thought: I can look up every value at once, then add them."]
        lines += [f'{i + 1}. search("{self.query(i)}")' for i in range(self.k)]
        refs = " + ".join(f"${i + 1}" for i in range(self.k))
        lines += [f'{self.k + 1}. calculator("{refs}")', f"{self.k + 2}. join()<END_OF_PLAN>"]
        return "\n".join(lines)

    def react_step(self, step: int) -> str:
        if step < self.k:
            query = self.query(step)
            return f' I still need the {query}.\nAction: search("{query}")'
        if step == self.k:
            total = " + ".join(str(v) for v in self.values)
            return f' I have every value; add them.\nAction: calculator("{total}")'
        return f" The total is {self.answer}.\nAction: Finish({self.answer})"


def make_questions(n: int, seed: int) -> list[Question]:
    rng = random.Random(seed)
    out = []
    for qid in range(n):
        k = 2 + qid % 5  # an even mix of 2..6 searches
        entities = rng.sample(ENTITIES, k)
        latencies = [round(rng.uniform(0.2, 1.0), 3) for _ in range(k)]
        values = [rng.randrange(1_000, 3_000_000) for _ in range(k)]
        out.append(Question(qid, rng.choice(ATTRIBUTES), entities, latencies, values))
    return out


def question_registry(q: Question, scale: float) -> ToolRegistry:
    """The question's tools: its searches answer with its values after its latencies."""
    registry = ToolRegistry(ToolsConfig(default_max_concurrency=16))
    latency = {q.query(i): q.latencies[i] * scale for i in range(q.k)}
    answers = {q.query(i): q.values[i] for i in range(q.k)}
    registry.register("search", SimulatedSearch(lambda query: latency[query], answers))
    registry.register("calculator", calculator)
    return registry


# -- parallel mode: the two sides ------------------------------------------------------------


@dataclass(slots=True)
class SideResult:
    latency_s: float
    llm_calls: int
    tool_result_ok: bool
    answer: str


async def run_react(q: Question, llm: ScriptedLLM, scale: float) -> SideResult:
    """Sequential ReAct: LLM step, then its tool, then the next step with the observation."""
    executor = ToolExecutor(question_registry(q, scale))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    history, computed, answer = "", None, ""
    program = f"react-{q.qid}"
    for step in range(q.k + 2):
        cue = f"react:{q.qid}:{step}"
        llm.replies[cue] = q.react_step(step)
        prompt = f"{REACT_SYSTEM}Question: {q.text}\n{history}Thought {step + 1}: [{cue}]"
        reply = await llm.complete(prompt, program_id=program)
        action = reply.rsplit("Action:", 1)[1].strip()
        tool, args, kwargs = parse_call(action)
        if tool == "Finish":
            answer = str(args[0]) if args else ""
            break
        named = executor.registry.get(tool).bind(kwargs, args)
        observation = await executor.run(tool, named, program_id=program, call_id=f"s{step}")
        if tool == "calculator":
            computed = observation
        history += f"Thought {step + 1}:{reply}\nObservation {step + 1}: {observation}\n"
    await llm.end(program)
    await executor.aclose()
    return SideResult(loop.time() - t0, step + 1, computed == q.answer, answer)


@dataclass(slots=True)
class ParallelRun:
    side: SideResult
    plan: PlanSubmission
    join_s: float
    t0: float


async def run_llmcompiler(q: Question, llm: ScriptedLLM, scale: float) -> ParallelRun:
    """LLMCompiler on the scheduler's data-flow graph, as the server runs a plan: the
    planner call's streamed plan adds each task as a graph tool call the moment its line
    is complete (it starts when the tasks it references are done), then one joiner call
    reads every task's result."""
    executor = ToolExecutor(question_registry(q, scale))
    scheduler, program = llm.scheduler, f"compiler-{q.qid}"
    llm.executors[program] = executor
    loop = asyncio.get_running_loop()
    plan_cue, join_cue = f"plan:{q.qid}", f"join:{q.qid}"
    llm.replies[plan_cue] = q.plan()
    llm.replies[join_cue] = f"Thought: every value is known.\nAction: Finish({q.answer})"
    planner = CallSpec(id="plan", output="plan", sampling=SAMPLING,
                       prompt=f"{PLANNER_SYSTEM}Question: {q.text}\nPlan: [{plan_cue}]")
    t0 = loop.time()
    await scheduler.submit_program(ProgramSpec(program_id=program, calls=[planner]))
    plan = await submit_plan(scheduler, program, scheduler.stream_variable(program, "plan"),
                             executor.registry)
    scratchpad = scratchpad_template(plan.tasks)
    joiner = CallSpec(id="join", output="answer", sampling=SAMPLING,
                      prompt=f"{JOINER_SYSTEM}Question: {q.text}\n{scratchpad}"
                      f"Answer: [{join_cue}]")
    await scheduler.add_calls(program, [joiner])
    answer = parse_joiner_output(await scheduler.wait_variable(program, "answer")).answer
    latency = loop.time() - t0
    computed = json.loads(await scheduler.wait_variable(program, task_variable(q.k + 1)))
    join = next(c for c in scheduler.program_state(program).calls if c.id == "join")
    await llm.end(program)
    del llm.executors[program]
    await executor.aclose()
    side = SideResult(latency, 2, computed == q.answer, answer)
    return ParallelRun(side, plan, (join.finished_at or 0.0) - (join.queued_at or 0.0), t0)


def ideal_latency(q: Question, run: ParallelRun, scale: float) -> tuple[float, float]:
    """(streaming critical path, non-streaming critical path) of the question's plan with
    zero overhead: a task starts when its line was streamed and its inputs are ready."""
    tasks = run.plan.tasks
    finish: dict[int, float] = {}
    for index, task in tasks.items():
        if task.is_join:
            continue
        duration = q.latencies[index - 1] * scale if task.tool == "search" else 0.0
        ready = max([task.parsed_at - run.t0] + [finish[d] for d in task.dependencies])
        finish[index] = ready + duration
    plan_done = run.plan.plan_done_at - run.t0
    streaming = max([plan_done, *finish.values()]) + run.join_s
    critical = max(q.latencies) * scale  # the searches are independent; the sum is instant
    return streaming, plan_done + critical + run.join_s


async def bench_parallel(args: argparse.Namespace, progress: Callable[[], None]) -> dict[str, Any]:
    scale = args.time_scale
    questions = make_questions(args.n, args.seed)
    react_llm = await ScriptedLLM(scale, args.seed).start()
    compiler_llm = await ScriptedLLM(scale, args.seed).start()
    rows = []
    for q in questions:
        if q.qid % 2:  # alternate the order, so drift in machine load hits both sides
            par = await run_llmcompiler(q, compiler_llm, scale)
            seq = await run_react(q, react_llm, scale)
        else:
            seq = await run_react(q, react_llm, scale)
            par = await run_llmcompiler(q, compiler_llm, scale)
        ideal, ideal_batch = ideal_latency(q, par, scale)
        rows.append({
            "qid": q.qid, "searches": q.k, "latencies_s": [x * scale for x in q.latencies],
            "sequential_s": seq.latency_s, "parallel_s": par.side.latency_s,
            "ideal_s": ideal, "ideal_nonstreaming_s": ideal_batch,
            "sequential_llm_calls": seq.llm_calls, "parallel_llm_calls": par.side.llm_calls,
            "tools_correct": seq.tool_result_ok and par.side.tool_result_ok,
            "answers": [seq.answer, par.side.answer],
        })  # fmt: skip
        progress()
    for llm in (react_llm, compiler_llm):
        await llm.close()
    return summarize_parallel(rows)


def summarize_parallel(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def block(subset: list[dict[str, Any]]) -> dict[str, Any]:
        seq = sum(r["sequential_s"] for r in subset)
        par = sum(r["parallel_s"] for r in subset)
        ideal = sum(r["ideal_s"] for r in subset)
        batch = sum(r["ideal_nonstreaming_s"] for r in subset)
        return {
            "questions": len(subset),
            "speedup": seq / par,
            "ideal_speedup": seq / ideal,
            "speedup_vs_ideal": ideal / par,
            "ideal_speedup_nonstreaming": seq / batch,
            "latency_reduction": 1 - par / seq,
            "sequential_mean_s": seq / len(subset),
            "parallel_mean_s": par / len(subset),
            "ideal_mean_s": ideal / len(subset),
        }

    out = block(rows)
    out["per_question_speedup_mean"] = statistics.fmean(
        r["sequential_s"] / r["parallel_s"] for r in rows
    )
    out["tools_correct"] = all(r["tools_correct"] for r in rows)
    out["by_searches"] = {
        str(k): block([r for r in rows if r["searches"] == k])
        for k in sorted({r["searches"] for r in rows})
    }
    out["questions_detail"] = rows
    return out


# -- partial mode: workloads -----------------------------------------------------------------


@dataclass(slots=True)
class Instance:
    workload: str
    iid: int
    reply: str  # what the model writes (the tool's input)
    durations: list[float]  # model seconds of each part's work, in part order
    chained: bool  # parts' work runs one after another (code, plan) or concurrently
    tool: str


def code_instance(iid: int, rng: random.Random) -> Instance:
    """A data-gathering script: each `fetch` stands for a statement with real work (an
    I/O-bound load, here a sleep in the child process) that takes about as long to run
    as the next statement takes to decode."""
    names = rng.sample(
        ["orders", "customers", "invoices", "refunds", "shipments", "payments", "reviews",
         "returns", "stock", "prices", "coupons", "carts", "sessions", "clicks"], 12,
    )  # fmt: skip
    lines = [f"{name} = fetch({name!r}, {{seconds}})" for name in names]
    last = f"print(sum(len(rows) for rows in [{', '.join(names[:4])}]))"
    texts = [line.format(seconds="0.000") for line in lines] + [last]
    durations = [
        round(tokens_of(texts[i + 1] + "\n") * TOKEN_SECONDS * rng.uniform(0.85, 1.15), 3)
        for i in range(len(lines))
    ]
    header = [
        "```python",
        "import time",
        "def fetch(table, seconds):",
        "    time.sleep(seconds)",
        "    return [table] * 3",
    ]
    body = [line.format(seconds=f"{d:.3f}") for line, d in zip(lines, durations, strict=True)]
    reply = "\n".join(header + body + [last, "```"]) + "\n"
    # parts, in order: the import, the def, the fetches, the print
    return Instance("code", iid, reply, [0.0, 0.0, *durations, 0.0], True, "python")


def search_instance(iid: int, rng: random.Random) -> Instance:
    fields = {
        "query": f"{rng.choice(ATTRIBUTES)} trends for {rng.choice(ENTITIES)} in the last decade",
        "region": f"{rng.choice(ENTITIES)} metropolitan area and surrounding districts",
        "sources": "official statistics offices, peer-reviewed journals and city reports",
        "time_range": f"from {rng.randrange(2000, 2012)} to {rng.randrange(2015, 2025)}",
        "language": rng.choice(["English", "French", "German", "Spanish"]),
    }
    reply = json.dumps(fields, indent=1)
    durations = [
        round(tokens_of(json.dumps(v)) * TOKEN_SECONDS * rng.uniform(0.5, 1.5), 3)
        for v in fields.values()
    ]
    return Instance("search", iid, reply, durations, False, "multi_search")


def plan_instance(iid: int, rng: random.Random) -> Instance:
    a, b = rng.sample(ENTITIES, 2)
    steps = [
        f"Book a morning flight from {a} to {b} for two adults on the first Monday",
        f"Reserve a hotel in central {b} within walking distance of the old town",
        f"Buy rail passes for the regional trains around {b} for three days",
        f"Schedule a guided museum tour in {b} on the Tuesday afternoon",
        "Book a dinner table for two near the hotel on the Tuesday evening",
        f"Book the return flight from {b} to {a} on the Thursday evening",
    ]
    fields = {f"step_{i + 1}": s for i, s in enumerate(steps)}
    reply = json.dumps(fields, indent=1)
    durations = [
        round(tokens_of(json.dumps(steps[min(i + 1, len(steps) - 1)])) * TOKEN_SECONDS
              * rng.uniform(0.8, 1.2), 3)
        for i in range(len(steps))
    ]  # fmt: skip
    return Instance("plan", iid, reply, durations, True, "validate_plan")


WORKLOADS = {"code": code_instance, "search": search_instance, "plan": plan_instance}


def partial_registry(inst: Instance, scale: float, code_runner: CodeRunnerTool) -> ToolRegistry:
    registry = ToolRegistry(ToolsConfig(default_max_concurrency=16))
    if inst.tool == "python":
        registry.register("python", incremental=code_runner, timeout_s=60)
        return registry
    delay = dict(zip(json.loads(inst.reply), (d * scale for d in inst.durations), strict=True))

    async def work(name: str, value: Any) -> Any:
        await asyncio.sleep(delay[name])
        return len(str(value))

    if inst.tool == "multi_search":
        registry.register("multi_search", incremental=lambda: MultiFieldSearch(work))
    else:
        registry.register("validate_plan", incremental=lambda: PlanValidator(work))
    return registry


def scale_code(reply: str, scale: float) -> str:
    """Compress the code's sleeps with the engine's time scale (same text length)."""
    return re.sub(
        r"(\w+ = fetch\('\w+', )(\d+\.\d{3})\)",
        lambda m: f"{m.group(1)}{float(m.group(2)) * scale:.3f})",
        reply,
    )


# -- partial mode: runs -----------------------------------------------------------------


@dataclass(slots=True)
class PartialSide:
    latency_s: float
    ok: bool
    part_times: list[float] = field(default_factory=list)  # when each part was complete
    stream_s: float = 0.0


async def timed_stream(
    stream: AsyncIterator[str], marks: list[tuple[float, str]]
) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    try:
        async for delta in stream:
            marks.append((loop.time(), delta))
            yield delta
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


def part_completion_times(inst: Instance, marks: list[tuple[float, str]], t0: float) -> list[float]:
    """When each part's text was complete in the stream (the parser run offline)."""
    parser: Any = CodeStatementStream() if inst.workload == "code" else JsonArgumentStream()
    times: list[float] = []
    for at, delta in marks:
        times += [at - t0] * len(parser.feed(delta))
    return times + [marks[-1][0] - t0] * len(parser.close())


async def run_partial_side(
    inst: Instance, llm: ScriptedLLM, scale: float, code_runner: CodeRunnerTool, partial: bool
) -> PartialSide:
    executor = ToolExecutor(partial_registry(inst, scale, code_runner))
    side = "with" if partial else "without"
    cue = f"{inst.workload}:{inst.iid}:{side}"
    llm.replies[cue] = scale_code(inst.reply, scale) if inst.workload == "code" else inst.reply
    prompt = f"Write the {inst.workload} input for task {inst.iid}. [{cue}]"
    marks: list[tuple[float, str]] = []
    program = f"{cue}"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    result = await run_partial_tool(
        executor, inst.tool, timed_stream(llm.stream(prompt, program_id=program), marks),
        program_id=program, call_id="tool", partial=partial,
    )  # fmt: skip
    latency = result.finished_at - t0
    await llm.end(program)
    await executor.aclose()
    value = result.value
    ok = bool(value.get("ok", True)) if isinstance(value, dict) else value is not None
    if inst.workload == "plan":
        ok = bool(value["valid"])
    return PartialSide(latency, ok, part_completion_times(inst, marks, t0), marks[-1][0] - t0)


def ideal_partial(inst: Instance, side: PartialSide, scale: float) -> float:
    """Zero-overhead partial execution: each part's work starts when the part is written
    (and, if chained, when the previous part's work is done)."""
    done = 0.0
    ends = []
    for at, duration in zip(side.part_times, inst.durations, strict=True):
        start = max(at, done) if inst.chained else at
        done = start + duration * scale
        ends.append(done)
    return max([side.stream_s, *ends])


async def bench_partial(args: argparse.Namespace, progress: Callable[[], None]) -> dict[str, Any]:
    scale = args.time_scale
    # Each side has its own code runner, kept warm (a started child waits for the next
    # run), so neither side's latency includes starting an interpreter.
    code_config = CodeRunnerConfig(timeout_s=60, cpu_s=60, prewarm=True)
    runners = {False: CodeRunnerTool(code_config), True: CodeRunnerTool(code_config)}
    for runner in runners.values():
        await runner.warm()
    llm_without = await ScriptedLLM(scale, args.seed).start()
    llm_with = await ScriptedLLM(scale, args.seed).start()
    rng = random.Random(args.seed)
    rows = []
    for name in args.workloads:
        for iid in range(args.n):
            inst = WORKLOADS[name](iid, rng)
            sides = [(False, llm_without), (True, llm_with)]
            if iid % 2:
                sides.reverse()
            results = {}
            for partial, llm in sides:
                results[partial] = await run_partial_side(
                    inst, llm, scale, runners[partial], partial
                )
            without, with_ = results[False], results[True]
            rows.append({
                "workload": name, "iid": iid,
                "without_s": without.latency_s, "with_s": with_.latency_s,
                "ideal_with_s": ideal_partial(inst, with_, scale),
                "decode_s": without.stream_s,
                "tool_work_s": (sum(inst.durations) if inst.chained else max(inst.durations))
                * scale,
                "ok": without.ok and with_.ok,
            })  # fmt: skip
            progress()
    for llm in (llm_without, llm_with):
        await llm.close()
    for runner in runners.values():
        await runner.aclose()
    return summarize_partial(rows, args.workloads)


def summarize_partial(rows: list[dict[str, Any]], workloads: list[str]) -> dict[str, Any]:
    def block(subset: list[dict[str, Any]]) -> dict[str, Any]:
        without = sum(r["without_s"] for r in subset)
        with_ = sum(r["with_s"] for r in subset)
        ideal = sum(r["ideal_with_s"] for r in subset)
        return {
            "instances": len(subset),
            "latency_reduction": 1 - with_ / without,
            "ideal_latency_reduction": 1 - ideal / without,
            "speedup": without / with_,
            "ideal_speedup": without / ideal,
            "without_mean_s": without / len(subset),
            "with_mean_s": with_ / len(subset),
            "ideal_with_mean_s": ideal / len(subset),
            "decode_mean_s": statistics.fmean(r["decode_s"] for r in subset),
            "tool_work_mean_s": statistics.fmean(r["tool_work_s"] for r in subset),
            "all_ok": all(r["ok"] for r in subset),
        }

    per = {name: block([r for r in rows if r["workload"] == name]) for name in workloads}
    headline = "code" if "code" in per else None
    top = per[headline] if headline else block(rows)
    return {
        "latency_reduction": top["latency_reduction"],
        "speedup": top["speedup"],
        "ideal_speedup": top["ideal_speedup"],
        "latency_reduction_workload": headline or "all",
        "latency_reduction_all": block(rows)["latency_reduction"],
        "workloads": per,
        "instances_detail": rows,
    }


# -- CLI -----------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=["parallel", "partial"], default="parallel")
    parser.add_argument("--n", type=int, default=None,
                        help="questions (parallel, default 30) or instances per workload "
                        "(partial, default 8)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=["real", "virtual"], default="real")
    parser.add_argument("--time-scale", type=float, default=None,
                        help="engine and tool time compression in real time (default: "
                        "parallel 0.25, partial and virtual 1.0)")  # fmt: skip
    parser.add_argument("--workloads", default="code,search,plan", help="partial mode")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    parser.add_argument("--plot", type=Path, default=None, metavar="OUT.png")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    parallel = args.mode == "parallel"
    if args.n is None:
        args.n = 30 if parallel else 8
    if args.time_scale is None:  # virtual time costs no wall time: nothing to compress
        args.time_scale = 0.25 if parallel and args.clock == "real" else 1.0
    if args.clock == "virtual" and not parallel:
        raise SystemExit("--mode partial runs child processes: it needs --clock real")
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; choose from {sorted(WORKLOADS)}")
    total = args.n if parallel else args.n * len(args.workloads)
    bench = bench_parallel if parallel else bench_partial
    wall = time.perf_counter()
    with Progress(console=console, disable=args.no_progress, transient=True) as bar:
        task = bar.add_task(f"tools/{args.mode}", total=total)
        coro: Coroutine[Any, Any, dict[str, Any]] = bench(args, lambda: bar.advance(task))
        result = run_virtual(coro) if args.clock == "virtual" else asyncio.run(coro)
    report = {
        "mode": args.mode,
        "clock": args.clock,
        "time_scale": args.time_scale,
        "seed": args.seed,
        "n": args.n,
        "engine": "sim (continuous batching; Llama-3-8B on H100 step-cost model)",
        "wall_s": time.perf_counter() - wall,
        **result,
    }
    print_summary(console, report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=_jsonable))
        console.print(f"wrote {args.json}")
    if args.plot is not None:
        plot(report, args.plot)
        console.print(f"wrote {args.plot}")
    return 0


def _jsonable(value: Any) -> Any:
    return asdict(value) if hasattr(value, "__dataclass_fields__") else str(value)


def print_summary(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    if report["mode"] == "parallel":
        table = Table(title=f"parallel function calls ({report['clock']} clock)")
        for col in ("searches", "n", "ReAct s", "LLMCompiler s", "ideal s", "speedup", "ideal"):
            table.add_column(col, justify="right")
        groups = {**report["by_searches"], "all": report}
        for key, b in groups.items():
            n = b["questions"] if key != "all" else len(report["questions_detail"])
            table.add_row(
                key, str(n), f"{b['sequential_mean_s']:.3f}", f"{b['parallel_mean_s']:.3f}",
                f"{b['ideal_mean_s']:.3f}", f"{b['speedup']:.2f}x", f"{b['ideal_speedup']:.2f}x",
            )  # fmt: skip
        console.print(table)
        console.print(
            f"speedup {report['speedup']:.2f}x, ideal {report['ideal_speedup']:.2f}x "
            f"({report['speedup_vs_ideal']:.1%} of ideal); tools correct: "
            f"{report['tools_correct']}"
        )
    else:
        table = Table(title=f"partial tool execution (time scale {report['time_scale']})")
        for col in ("workload", "n", "without s", "with s", "ideal s", "reduction", "ideal"):
            table.add_column(col, justify="right")
        for name, b in report["workloads"].items():
            table.add_row(
                name, str(b["instances"]), f"{b['without_mean_s']:.3f}",
                f"{b['with_mean_s']:.3f}", f"{b['ideal_with_mean_s']:.3f}",
                f"{b['latency_reduction']:.1%}", f"{b['ideal_latency_reduction']:.1%}",
            )  # fmt: skip
        console.print(table)
        console.print(
            f"latency reduction ({report['latency_reduction_workload']}): "
            f"{report['latency_reduction']:.1%}"
        )


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if report["mode"] == "parallel":
        groups = report["by_searches"]
        labels = [f"{k} searches" for k in groups]
        series = {
            "sequential (ReAct)": [g["sequential_mean_s"] for g in groups.values()],
            "parallel (LLMCompiler, streaming)": [g["parallel_mean_s"] for g in groups.values()],
            "ideal (critical path)": [g["ideal_mean_s"] for g in groups.values()],
        }
        title = (
            f"Parallel function calls: {report['speedup']:.2f}x "
            f"(ideal {report['ideal_speedup']:.2f}x)"
        )
    else:
        groups = report["workloads"]
        labels = list(groups)
        series = {
            "without partial execution": [g["without_mean_s"] for g in groups.values()],
            "with partial execution": [g["with_mean_s"] for g in groups.values()],
            "ideal pipeline": [g["ideal_with_mean_s"] for g in groups.values()],
        }
        title = f"Partial tool execution: -{report['latency_reduction']:.1%} latency (code)"
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))], labels)
    ax.set_ylabel(f"mean latency (s, time scale {report['time_scale']})")
    ax.set_title(title)
    ax.set_ylim(0, 1.35 * max(max(values) for values in series.values()))
    ax.legend(loc="upper left", fontsize="small", ncols=len(series))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
