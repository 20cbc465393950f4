"""One benchmark run: a trace, at one arrival rate, under one policy, in virtual time.

Each program is a client coroutine that talks to the real `Scheduler` the way an agent
behind the OpenAI proxy does (`open_program`, `llm_call` with thread and parent ids,
`end_program`), sleeping for its tool latencies between calls. The scheduler drives
`SimEngine` replicas (one shared synthetic responder, told each request's output length so
that the *engine* does not know it: it reserves KV as it decodes). Everything runs on
`run_virtual`, so hours of serving take seconds.
"""

from __future__ import annotations

import asyncio
import gc
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from engine_backend.radix_cache import KeyedTokens
from engine_backend.sim import ReplyBuilder, SimConfig, SimEngine, SimTokenizer, SyntheticResponder
from engine_backend.types import GenerateRequest, SamplingParams
from engine_backend.virtual_time import run_virtual
from scheduler.config import SchedulerConfig
from scheduler.events import EventKind, SchedulerEvent
from scheduler.scheduler import Scheduler

from .workloads import (
    BfclShape,
    ChatShape,
    LatsShape,
    MapReduceShape,
    ProgramTrace,
    SweShape,
    Trace,
    shared_segment,
)


@dataclass(slots=True)
class ProgramResult:
    index: int
    kind: str
    arrival: float
    finish: float
    tokens: int  # all generated tokens
    cp_tokens: int  # tokens along the critical path
    calls: int
    queue_wait: float = 0.0

    @property
    def token_latency(self) -> float:
        """Response time (for a DAG: its critical-path time, i.e. makespan) per generated
        token: the issue's reading of Autellix's program-level token latency."""
        return (self.finish - self.arrival) / max(self.tokens, 1)

    @property
    def cp_token_latency(self) -> float:
        """Stricter variant for DAGs: per token on the critical path only."""
        return (self.finish - self.arrival) / max(self.cp_tokens, 1)


@dataclass(slots=True)
class RunResult:
    policy: str
    rate: float
    programs: list[ProgramResult]
    virtual_s: float
    wall_s: float
    calls: int
    cpu_s: float = 0.0
    stopped_early: bool = False  # `stop_when` ended the run (a sweep point already failed)
    engine: dict[str, float] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    # (virtual time, the replicas' mean busy seconds) at each program's arrival, to read
    # the engines' utilization over the steady-state window.
    busy_at_arrivals: list[tuple[float, float]] = field(default_factory=list)


@dataclass(slots=True)
class CallOutcome:
    output: list[int]
    tokens: int


class Client:
    """The per-run state the program coroutines share: the scheduler, the responder that
    gets each request's output length, and the shared prompt segments."""

    def __init__(self, scheduler: Scheduler, responder: SyntheticResponder, trace: Trace) -> None:
        self.scheduler = scheduler
        self.responder = responder
        p = trace.params
        # Prompts are int64 arrays (`Tokens`) built by appending: an append is a memcpy,
        # and the engine and router encode an array for their radix trees by one copy.
        self.chat_system = _segment("chat-system", 0, p.chat_system_tokens)
        self.bfcl_header = _segment("bfcl-header", 0, p.bfcl_header_tokens)
        self.bfcl_docs = [
            _segment("bfcl-docs", i, max(1, round(p.bfcl_doc_tokens * (0.6 + 0.8 * (i % 5) / 4))))
            for i in range(p.bfcl_doc_sets)
        ]
        self.lats_gen_prefix = _segment("lats-gen", 0, p.lats_gen_prefix_tokens)
        self.lats_value_prefix = _segment("lats-value", 0, p.lats_value_prefix_tokens)
        self.mr_map_instruction = _segment("mr-map", 0, p.mr_instruction_tokens)
        self.mr_reduce_instruction = _segment("mr-reduce", 0, p.mr_instruction_tokens)
        self.swe_system = _segment("swe-system", 0, p.swe_system_tokens)
        self.params = p
        self.tenants: dict[str, str] = {}  # program id -> tenant, when not the default
        self._template = GenerateRequest(rid="template", input_ids=[0])
        self._sampling: dict[int, SamplingParams] = {}

    async def call(
        self,
        program_id: str,
        call_id: str,
        prompt: Sequence[int],
        out_tokens: int,
        max_new: int,
        *,
        thread: str = "main",
        parents: tuple[str, ...] = (),
    ) -> CallOutcome:
        rid = f"{program_id}/{call_id}"
        self.responder.expect(rid, out_tokens)
        # model_copy of validated templates: no per-call validation or default factories.
        sampling = self._sampling.get(max_new)
        if sampling is None:
            sampling = self._sampling[max_new] = SamplingParams(max_new_tokens=max_new)
        request = self._request(rid=rid, input_ids=prompt, sampling=sampling,
                                program_id=program_id)
        output: list[int] | None = None
        tokens = 0
        async for chunk in self.scheduler.llm_call(
            program_id, request, tenant=self.tenants.get(program_id, DEFAULT_TENANT),
            thread_id=thread, parent_ids=parents, call_id=call_id
        ):
            if chunk.token_ids:
                # A single chunk's list is kept as is (the sim's carries its encoded key,
                # so the next prompt built from it encodes nothing).
                output = chunk.token_ids if output is None else output + chunk.token_ids
            if chunk.finish_reason is not None:
                tokens = chunk.completion_tokens
        return CallOutcome(output if output is not None else [], tokens)

    def _request(self, **fields: Any) -> GenerateRequest:
        """The validated template with `fields` replaced: what `model_copy(update=...)`
        does (a shallow copy of the field values, the updated names marked set), without
        its generic path, which cost the bench 3% of its time."""
        template = self._template
        request = GenerateRequest.__new__(GenerateRequest)
        values = template.__dict__.copy()
        values.update(fields)
        object.__setattr__(request, "__dict__", values)
        object.__setattr__(request, "__pydantic_fields_set__",
                           template.__pydantic_fields_set__ | fields.keys())
        object.__setattr__(request, "__pydantic_extra__", None)
        object.__setattr__(request, "__pydantic_private__", None)
        return request


Tokens = array  # of int64 ("q"): a prompt as the client sends it (the engines take any
# int64 container; its buffer is already the radix trees' key layout)


def _segment(name: str, index: int, tokens: int) -> Tokens:
    return array("q", shared_segment(name, index, tokens))


def int64s(ids: list[int]) -> Tokens:
    """Non-negative token ids as an int64 array: through "Q", which CPython converts about
    twice as fast as "q" (the bytes are the same for ids below 2**63)."""
    return array("q", array("Q", ids).tobytes())


def join(*parts: Sequence[int]) -> Tokens:
    """The parts end to end, as a new array: copies of machine ints, no int objects.
    A sim reply's tokens bring their encoded key, which is this array's layout."""
    out = array("q")
    for part in parts:
        if type(part) is array:
            out += part
        elif type(part) is KeyedTokens and (key := part.key_if_current()) is not None:
            out.frombytes(key.data)
        else:
            out += int64s(list(part))
    return out


class Fresh:
    """Fresh (unshared) content of one program: consecutive token ids."""

    __slots__ = ("cursor",)

    def __init__(self, base: int) -> None:
        self.cursor = base

    def __call__(self, n: int) -> Tokens:
        start = self.cursor
        self.cursor = start + n
        return int64s(list(range(start, start + n)))


async def run_chat(client: Client, program: ProgramTrace, shape: ChatShape) -> tuple[int, int, int]:
    pid, fresh = program.id, Fresh(program.token_base)
    context = client.chat_system
    tokens = 0
    parent: tuple[str, ...] = ()
    for turn, (user, reply) in enumerate(shape.turns):
        context = join(context, fresh(user))
        call_id = f"t{turn}"
        out = await client.call(pid, call_id, context, reply, client.params.chat_reply_max,
                                parents=parent)
        context = join(context, out.output)
        tokens += out.tokens
        parent = (call_id,)
    return tokens, tokens, len(shape.turns)


async def run_bfcl(client: Client, program: ProgramTrace, shape: BfclShape) -> tuple[int, int, int]:
    pid, fresh = program.id, Fresh(program.token_base)
    context = join(client.bfcl_header, client.bfcl_docs[shape.doc_set], fresh(shape.query_tokens))
    tokens = 0
    parent: tuple[str, ...] = ()
    last = len(shape.steps) - 1
    for step, (out_tokens, latency, result_tokens) in enumerate(shape.steps):
        call_id = f"s{step}"
        out = await client.call(pid, call_id, context, out_tokens, 256, parents=parent)
        tokens += out.tokens
        context = join(context, out.output)
        parent = (call_id,)
        if step < last:
            await asyncio.sleep(latency)  # the tool runs on the client side
            context = join(context, fresh(result_tokens))
    return tokens, tokens, len(shape.steps)


async def run_swe(client: Client, program: ProgramTrace, shape: SweShape) -> tuple[int, int, int]:
    """A coding agent: one growing context, a command per turn, its observation appended
    after the tool (edit, test run) returns."""
    pid, fresh = program.id, Fresh(program.token_base)
    context = join(client.swe_system, fresh(shape.issue_tokens))
    tokens = 0
    parent: tuple[str, ...] = ()
    last = len(shape.steps) - 1
    for step, (out_tokens, latency, observation) in enumerate(shape.steps):
        call_id = f"s{step}"
        out = await client.call(pid, call_id, context, out_tokens,
                                client.params.swe_output_max, parents=parent)
        tokens += out.tokens
        context = join(context, out.output)
        parent = (call_id,)
        if step < last:
            await asyncio.sleep(latency)  # the command runs on the client side
            context = join(context, fresh(observation))
    return tokens, tokens, len(shape.steps)


@dataclass(slots=True)
class _Node:
    trajectory: Tokens
    depth: int
    eval_call: str | None
    value: int  # the evaluation's length stands in for its score


async def run_lats(client: Client, program: ProgramTrace, shape: LatsShape) -> tuple[int, int, int]:
    pid, fresh = program.id, Fresh(program.token_base)
    p = client.params
    question = fresh(shape.question_tokens)
    gen_head = join(client.lats_gen_prefix, question)
    value_head = join(client.lats_value_prefix, question)
    nodes = [_Node(array("q"), 0, None, 0)]
    last_children: list[_Node] = []
    loop = asyncio.get_running_loop()
    total = 0
    path_tokens = 0  # critical-path tokens up to the end of the previous iteration
    calls = 0
    for i, it in enumerate(shape.iterations):
        if it.deepen and last_children:
            parent = max(last_children, key=lambda n: n.value)
        else:
            parent = nodes[it.parent % len(nodes)]
        if parent.depth >= p.lats_max_depth:
            parent = nodes[0]
        gen_prompt = join(gen_head, parent.trajectory)
        observations = [fresh(n) for n in it.obs_tokens]  # allocated in a fixed order
        parents = (parent.eval_call,) if parent.eval_call else ()

        async def child(j: int, i: int = i, it: Any = it, parent: _Node = parent,
                        gen_prompt: Tokens = gen_prompt, parents: tuple[str, ...] = parents,
                        observations: list[Tokens] = observations) -> tuple[_Node, int, int, float]:
            gen_id, eval_id = f"g{i}.{j}", f"v{i}.{j}"
            gen = await client.call(pid, gen_id, gen_prompt, it.gen_tokens[j], 256,
                                    thread=f"b{j}", parents=parents)
            await asyncio.sleep(it.tool_latency[j])
            trajectory = join(parent.trajectory, gen.output, observations[j])
            val = await client.call(pid, eval_id, join(value_head, trajectory), it.value_tokens[j],
                                    64, thread=f"b{j}", parents=(gen_id,))
            node = _Node(trajectory, parent.depth + 1, eval_id, val.tokens)
            return node, gen.tokens + val.tokens, gen.tokens + val.tokens, loop.time()

        results = await asyncio.gather(*(child(j) for j in range(len(it.gen_tokens))))
        calls += 2 * len(results)
        last_children = [r[0] for r in results]
        nodes.extend(last_children)
        total += sum(r[1] for r in results)
        # The next iteration waited for the last child to finish: the path runs through it.
        path_tokens += max(results, key=lambda r: r[3])[2]
    best = max(last_children or nodes, key=lambda n: n.value)
    answer = await client.call(pid, "answer", join(gen_head, best.trajectory), shape.answer_tokens,
                               256, parents=(best.eval_call,) if best.eval_call else ())
    total += answer.tokens
    return total, path_tokens + answer.tokens, calls + 1


async def run_mapreduce(
    client: Client, program: ProgramTrace, shape: MapReduceShape
) -> tuple[int, int, int]:
    pid, fresh = program.id, Fresh(program.token_base)
    chunks = [fresh(n) for n, _ in shape.chunks]
    loop = asyncio.get_running_loop()

    async def map_one(j: int) -> tuple[CallOutcome, float]:
        out = await client.call(pid, f"map{j}", join(client.mr_map_instruction, chunks[j]),
                                shape.chunks[j][1], 256, thread=f"m{j}")
        return out, loop.time()

    maps = await asyncio.gather(*(map_one(j) for j in range(len(chunks))))
    summaries = [t for out, _ in maps for t in out.output]
    reduce = await client.call(pid, "reduce", join(client.mr_reduce_instruction, summaries),
                               shape.reduce_tokens, 1024,
                               parents=tuple(f"map{j}" for j in range(len(chunks))))
    last_map = max(maps, key=lambda m: m[1])[0]
    total = sum(out.tokens for out, _ in maps) + reduce.tokens
    return total, last_map.tokens + reduce.tokens, len(chunks) + 1


RUNNERS: dict[type, Callable[..., Any]] = {
    ChatShape: run_chat,
    BfclShape: run_bfcl,
    LatsShape: run_lats,
    MapReduceShape: run_mapreduce,
    SweShape: run_swe,
}


def fork_counts(scheduler: Scheduler) -> dict[str, int]:
    """Fork prefill's work, where it is on (`scheduler/fork_prefill.py`): prefill-only
    requests sent, and the calls that waited for one instead of prefilling alone."""
    forks = scheduler.runner.forks
    if forks is None:
        return {}
    return {"fork_prefills": forks.prefills, "fork_shared_calls": forks.deduplicated}


DEFAULT_TENANT = "default"
TENANCIES = ("one", "by-type")


@dataclass(slots=True)
class BenchSetup:
    """What every policy shares in a comparison: engines, cache, budget, router, and who
    the programs belong to."""

    replicas: int
    sim: SimConfig
    scheduler: SchedulerConfig  # `policy` is overridden per run
    # "one": every program is the default tenant's; "by-type": each program type is a
    # tenant of its own (what `dlpm`'s per-tenant fairness works on).
    tenants: str = "one"

    def tenant_of(self, program: ProgramTrace) -> str:
        return program.kind if self.tenants == "by-type" else DEFAULT_TENANT

    def for_policy(self, policy: str, **overrides: Any) -> SchedulerConfig:
        return self.scheduler.model_copy(update={"policy": policy, **overrides})


def run_trace(
    trace: Trace,
    policy: str,
    rate: float,
    setup: BenchSetup,
    *,
    scheduler_overrides: dict[str, Any] | None = None,
    sim_overrides: dict[str, Any] | None = None,
    on_program_done: Callable[[], None] | None = None,
    stop_when: Callable[[ProgramResult], bool] | None = None,
) -> RunResult:
    """Run every program of `trace` at `rate` programs/s (virtual time) under `policy`.
    `stop_when(result)` is asked after each program; True ends the run early."""
    wall, cpu = time.perf_counter(), time.process_time()
    config = setup.for_policy(policy, **(scheduler_overrides or {}))
    sim_config = setup.sim.model_copy(update=sim_overrides or {})
    with _few_collections():
        result = run_virtual(
            _run(trace, rate, setup, config, sim_config, on_program_done, stop_when)
        )
    result.wall_s = time.perf_counter() - wall
    result.cpu_s = time.process_time() - cpu
    return result


# Young-generation collections every this many net allocations (CPython's default: 700).
SIM_GC_THRESHOLD = 100_000


@contextmanager
def _few_collections() -> Iterator[None]:
    """A simulation allocates millions of short-lived objects (futures, timer handles,
    chunks, keys) over a large long-lived heap (the trace, the radix trees, every
    program's state); with CPython's default thresholds the cyclic collector re-scans
    that heap so often that it takes a quarter of the run. Freeze what exists before the
    run and collect young objects rarely: the same objects are freed (reference counting
    frees nearly all of them anyway), only the collector runs less often."""
    gc.collect()
    gc.freeze()
    old = gc.get_threshold()
    gc.set_threshold(SIM_GC_THRESHOLD, old[1], old[2])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


async def _run(
    trace: Trace,
    rate: float,
    setup: BenchSetup,
    config: SchedulerConfig,
    sim_config: SimConfig,
    on_program_done: Callable[[], None] | None,
    stop_when: Callable[[ProgramResult], bool] | None,
) -> RunResult:
    tokenizer = SimTokenizer()
    responder = SyntheticResponder(ReplyBuilder(tokenizer, sim_config.seed))
    engines = [
        SimEngine(sim_config, responder=responder, tokenizer=tokenizer)
        for _ in range(setup.replicas)
    ]
    scheduler = Scheduler(engines, config)
    await scheduler.start()
    waits: dict[str, float] = {}
    calls_by_tenant: dict[str, int] = {}

    def on_dispatch(event: SchedulerEvent) -> None:
        waits[event.program_id] = waits.get(event.program_id, 0.0) + (event.queue_wait_s or 0.0)
        calls_by_tenant[event.tenant] = calls_by_tenant.get(event.tenant, 0) + 1

    scheduler.add_listener(on_dispatch, kinds=(EventKind.CALL_DISPATCHED,))
    client = Client(scheduler, responder, trace)
    loop = asyncio.get_running_loop()
    start = loop.time()
    results: list[ProgramResult] = []
    stop = asyncio.Event()

    async def run_program(program: ProgramTrace, arrival: float) -> None:
        tenant = setup.tenant_of(program)
        pid = await scheduler.open_program(program.id, tenant=tenant)
        if tenant != DEFAULT_TENANT:
            client.tenants[pid] = tenant
        tokens, cp_tokens, calls = await RUNNERS[type(program.shape)](
            client, program, program.shape
        )
        await scheduler.end_program(pid, tenant=tenant)
        client.tenants.pop(pid, None)
        result = ProgramResult(program.index, program.kind, arrival, loop.time(), tokens,
                               cp_tokens, calls, waits.pop(pid, 0.0))
        results.append(result)
        if on_program_done is not None:
            on_program_done()
        if stop_when is not None and stop_when(result):
            stop.set()

    tasks: list[asyncio.Task[None]] = []
    busy: list[tuple[float, float]] = []

    async def arrive() -> None:
        for program in trace.programs:
            arrival = start + program.unit_arrival / rate
            delay = arrival - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            busy.append((loop.time(), sum(e.busy_seconds() for e in engines) / len(engines)))
            tasks.append(loop.create_task(run_program(program, arrival)))
        await asyncio.gather(*tasks)

    arrivals = loop.create_task(arrive())
    stopper = loop.create_task(stop.wait())
    await asyncio.wait((arrivals, stopper), return_when=asyncio.FIRST_COMPLETED)
    stopped_early = not arrivals.done()
    for task in (arrivals, stopper, *tasks):
        task.cancel()
    await asyncio.gather(arrivals, stopper, *tasks, return_exceptions=True)
    end = loop.time()
    engine_stats = [await engine.stats() for engine in engines]
    sched_stats = await scheduler.stats()
    await scheduler.close()
    results.sort(key=lambda r: r.index)
    hit = sum(s.cache_hit_tokens for s in engine_stats)
    query = sum(s.cache_query_tokens for s in engine_stats)
    return RunResult(
        policy=config.policy,
        rate=rate,
        programs=results,
        virtual_s=end - start,
        wall_s=0.0,
        calls=sched_stats.calls_finished,
        stopped_early=stopped_early,
        engine={
            "cache_hit_tokens": hit,
            "cache_query_tokens": query,
            "cache_hit_rate": hit / query if query else 0.0,
            "preemptions": sum(s.preemptions for s in engine_stats),
            "recomputed_tokens": sum(s.recomputed_tokens for s in engine_stats),
        },
        scheduler={
            "promotions": sched_stats.promotions,
            "preemptions": sched_stats.preemptions,
            "dispatched_per_replica": [r.dispatched for r in sched_stats.replicas],
            "calls_by_tenant": dict(sorted(calls_by_tenant.items())),
            **fork_counts(scheduler),
        },
        busy_at_arrivals=busy,
    )
