"""The program model: a program is a growing DAG of call nodes plus a history.

Edges come from semantic-variable data flow (a call that reads `{{x}}` depends on the call
that writes `x`) and from declared parents (proxy style, where no variables exist).
`Program.graph` is a networkx DiGraph over call ids (node attribute `call`), the model
that validation and introspection use. It is brought up to date when read, so the hot
path pays nothing for it; readiness uses the slotted `CallNode` fields (`parents`,
`unresolved`, `children`), which are O(1) per event.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import networkx as nx

from .errors import CallExistsError, ProgramValidationError
from .spec import CallSpec

if TYPE_CHECKING:
    from engine_backend.types import GenerateRequest

    from .ready_queue import ReadyHeap


class CallStatus(IntEnum):
    PENDING = 0  # waiting for its inputs
    QUEUED = 1  # ready, in a policy queue
    RUNNING = 2  # dispatched to a replica (or a tool is running)
    FINISHED = 3
    FAILED = 4
    CANCELLED = 5


CALL_STATUS_NAMES = ("pending", "queued", "running", "finished", "failed", "cancelled")
DONE_STATUSES = frozenset((CallStatus.FINISHED, CallStatus.FAILED, CallStatus.CANCELLED))


class ProgramStatus(IntEnum):
    RUNNING = 0  # has calls queued or running
    IDLE = 1  # open, nothing in flight (between calls, or waiting on the client)
    FINISHED = 2
    FAILED = 3
    CANCELLED = 4


PROGRAM_STATUS_NAMES = ("running", "idle", "finished", "failed", "cancelled")


@dataclass(slots=True)
class ProgramHistory:
    """What the policies know about a program: its attained service and waits.

    `service` is in the configured service unit (see `SchedulerConfig.service_metric`);
    `engine_time_s` and `weighted_tokens` are both always kept.
    """

    service: float = 0.0
    engine_time_s: float = 0.0
    weighted_tokens: float = 0.0
    wait_s: float = 0.0  # summed over calls
    wait_wall_s: float = 0.0  # time with at least one call queued (anti-starvation's W)
    calls_finished: int = 0
    engines_used: set[int] = field(default_factory=set)
    active_threads: dict[str, int] = field(default_factory=dict)  # thread -> open calls

    def thread_opened(self, thread: str) -> None:
        self.active_threads[thread] = self.active_threads.get(thread, 0) + 1

    def thread_closed(self, thread: str) -> None:
        left = self.active_threads.get(thread, 0) - 1
        if left > 0:
            self.active_threads[thread] = left
        else:
            self.active_threads.pop(thread, None)


@dataclass(slots=True, eq=False)
class VariableSlot:
    """A semantic variable: produced once, read by many; its value may stream."""

    name: str
    producer: str | None = None  # call id; None for program inputs
    parts: list[str] = field(default_factory=list)
    done: bool = False
    failed: BaseException | None = None
    readers: list[CallNode] = field(default_factory=list)
    _event: asyncio.Event | None = None
    _streams: list[asyncio.Queue[str | None]] | None = None

    @property
    def value(self) -> str | None:
        return "".join(self.parts) if self.done else None

    def event(self) -> asyncio.Event:
        if self._event is None:
            self._event = asyncio.Event()
            if self.done or self.failed is not None:
                self._event.set()
        return self._event

    def subscribe(self) -> asyncio.Queue[str | None]:
        """A queue of deltas (the current value first), then None at the end."""
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        so_far = "".join(self.parts)
        if so_far:
            queue.put_nowait(so_far)
        if self.done or self.failed is not None:
            queue.put_nowait(None)
        else:
            if self._streams is None:
                self._streams = []
            self._streams.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str | None]) -> None:
        if self._streams and queue in self._streams:
            self._streams.remove(queue)

    def append(self, delta: str) -> None:
        if not delta:
            return
        self.parts.append(delta)
        if self._streams:
            for queue in self._streams:
                queue.put_nowait(delta)

    def finish(self, value: str | None = None) -> None:
        if value is not None:
            self.parts = [value]
        elif len(self.parts) > 1:  # one string, not a streamed delta each, while it is kept
            self.parts = ["".join(self.parts)]
        self.done = True
        self._close()

    def fail(self, error: BaseException) -> None:
        self.failed = error
        self._close()

    def _close(self) -> None:
        if self._event is not None:
            # Its waiters hold it; a later `event()` makes a set one: an ended program
            # kept for state queries does not keep an Event and its waiter deque a variable.
            self._event.set()
            self._event = None
        if self._streams:
            for queue in self._streams:
                queue.put_nowait(None)
            self._streams = None


@dataclass(slots=True, eq=False)
class CallNode:
    """One LLM or tool call: its place in the graph, its scheduling state and its
    measurements. Slotted: thousands are created per second in benchmarks."""

    id: str
    program: Program
    kind: str  # "llm" | "tool"
    seq: int  # global arrival order (FCFS)
    created_at: float
    thread_id: str = "main"
    parents: tuple[str, ...] = ()
    spec: CallSpec | None = None
    request: GenerateRequest | None = None  # proxy calls; dropped when the call ends
    output: str | None = None  # variable it fills
    status: CallStatus = CallStatus.PENDING
    unresolved: int = 0  # parents/inputs not yet done
    children: list[CallNode] = field(default_factory=list)
    # policy state
    # Latency-critical (the client awaits its output) or upstream of such a call: the
    # leveled policies run it first within its queue (Parrot's criticality, propagated
    # to the calls it waits on).
    urgent: bool = False
    priority: float = 0.0  # attained-service rank; lower runs first
    rank_settled: bool = False  # the rank cannot change while it waits (policies/atlas.py)
    level: int = 0  # MLFQ queue
    key: tuple[Any, ...] = ()
    heap: ReadyHeap | None = None
    version: int = 0
    promote_at: float = float("inf")  # anti-starvation deadline
    # dispatch state
    prompt_len: int = 0
    budget_tokens: int = 0
    route_key: Any = None  # the prompt encoded for the router's prefix trees (cached)
    route_scale: float = 1.0  # tokens per route-key element
    replica: int = -1
    waiter: asyncio.Future[int] | None = None
    task: asyncio.Task[None] | None = None  # graph calls: the task executing it
    preempt_requested: bool = False
    # measurements (loop times; -1 = not yet)
    queued_at: float = -1.0
    dispatched_at: float = -1.0
    first_token_at: float = -1.0
    # Whether CALL_FIRST_TOKEN was sent: not when the first token came with the final
    # chunk (a whole answer), where the call's end event stands for it (`with_first_token`).
    first_token_sent: bool = False
    finished_at: float = -1.0
    wait: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    service: float = 0.0
    engine_time: float = 0.0
    preemptions: int = 0  # restarts: preemptions plus resumes after a replica failure
    retries: int = 0  # resumes on another replica after its replica failed
    output_parts: list[str] | None = None
    output_ids: list[int] | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.status >= CallStatus.FINISHED


@dataclass(slots=True, eq=False)
class Program:
    id: str
    tenant: str
    arrival: float
    seq: int  # global program arrival order
    engine_key: str = ""  # program id as engines see it (cache owner for retention)
    cache_salt: str | None = None  # its tenant's: engines share prefixes within a salt
    calls: dict[str, CallNode] = field(default_factory=dict)
    variables: dict[str, VariableSlot] = field(default_factory=dict)
    history: ProgramHistory = field(default_factory=ProgramHistory)
    status: ProgramStatus = ProgramStatus.IDLE
    single_call: bool = False
    # Whether PROGRAM_STARTED was sent, and whether the coming close's PROGRAM_ENDED was:
    # a one-call program's start and end ride on its call's events
    # (`SchedulerEvent.with_program_start`, `with_program_end`).
    start_sent: bool = False
    end_sent: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    ended_at: float | None = None
    error: str | None = None
    open_calls: int = 0  # queued + running + pending
    queued: set[CallNode] = field(default_factory=set)  # in a policy queue
    running: set[CallNode] = field(default_factory=set)
    last_call_by_thread: dict[str, CallNode] = field(default_factory=dict)
    home_replica: int = -1
    # replica -> context tokens its retention slot there covers (pinned now)
    retained_on: dict[int, int] = field(default_factory=dict)
    # replica -> longest context of its calls there since the last pin
    touched: dict[int, int] = field(default_factory=dict)
    # replicas that cached its context (told when it ends, to let that go first)
    cached_on: set[int] = field(default_factory=set)
    retention_timer: bool = False  # an idle-expiry timer is armed
    # The armed idle-end timer; cancelled when the program closes, so that a closed
    # program is not kept alive (calls, graph, specs) until the timeout.
    idle_timer: asyncio.TimerHandle | None = None
    idle_since: float = 0.0
    waiting_since: float = 0.0  # when its queue last went from empty to non-empty
    auto_ids: int = 0
    _graph: nx.DiGraph | None = None
    _graph_calls: int = 0  # how many of `calls` (in insertion order) `_graph` holds

    def drop_calls(self) -> None:
        """Forget the calls of a program the scheduler no longer keeps. A call points at
        its program and the program at its calls: left as a cycle, only the collector's
        full passes free them, and those grow with the live heap (tens of ms a pass at
        ten thousand kept programs, a stall for every request in flight)."""
        self.calls.clear()
        self.last_call_by_thread.clear()
        self.variables.clear()
        self.queued.clear()
        self.running.clear()
        self._graph = None
        self._graph_calls = 0

    @property
    def graph(self) -> nx.DiGraph:
        """The call DAG: nodes are call ids (attribute `call`), edges parent -> child."""
        graph = self._graph
        if graph is None:
            graph = self._graph = nx.DiGraph()
        if self._graph_calls < len(self.calls):
            for call in itertools.islice(self.calls.values(), self._graph_calls, None):
                graph.add_node(call.id, call=call)
                for parent in call.parents:
                    graph.add_edge(parent, call.id)
            self._graph_calls = len(self.calls)
        return graph

    @property
    def is_closed(self) -> bool:
        return self.status >= ProgramStatus.FINISHED

    @property
    def call_count(self) -> int:
        return len(self.calls)

    def next_call_id(self, prefix: str = "call") -> str:
        while True:
            self.auto_ids += 1
            call_id = f"{prefix}-{self.auto_ids}"
            if call_id not in self.calls:
                return call_id


def validate_new_calls(
    program: Program, calls: Iterable[CallSpec], *, max_calls: int, tools_available: bool
) -> None:
    """Check a batch of calls against the program before anything is added: ids, outputs,
    variables, parents, size and cycles. Raises `ProgramValidationError` naming the call
    or variable at fault. Costs O(batch): existing calls and variables are looked up, not
    copied, so a program grown call by call stays linear."""
    calls = list(calls)
    if len(program.calls) + len(calls) > max_calls:
        raise ProgramValidationError(
            f"program {program.id!r} would have {len(program.calls) + len(calls)} calls; "
            f"the limit is {max_calls}"
        )
    new_ids: set[str] = set()
    new_outputs: dict[str, str] = {}  # variable -> the new call that writes it
    for call in calls:
        if call.id in program.calls:
            raise CallExistsError(f"program {program.id!r} already has a call {call.id!r}")
        if call.id in new_ids:
            raise ProgramValidationError(f"duplicate call id {call.id!r}")
        new_ids.add(call.id)
        if call.kind == "tool" and not tools_available:
            raise ProgramValidationError(
                f"call {call.id!r} uses tool {call.tool!r} but no tool executor is configured"
            )
        if call.output is not None:
            writer = new_outputs.get(call.output) or _producer(program, call.output)
            if writer is not None:
                raise ProgramValidationError(
                    f"variable {call.output!r} is written by both {writer!r} "
                    f"and call {call.id!r}"
                )
            new_outputs[call.output] = call.id
    for call in calls:
        for name in call.input_variables():
            producer = new_outputs.get(name) or _producer(program, name)
            if producer is None:
                raise ProgramValidationError(
                    f"call {call.id!r} references unknown variable {name!r}"
                )
            if producer == call.id:
                raise ProgramValidationError(f"call {call.id!r} reads its own output {name!r}")
        for parent in call.parents:
            if parent not in program.calls and parent not in new_ids:
                raise ProgramValidationError(f"call {call.id!r} names unknown parent {parent!r}")
    _reject_cycles(calls, new_outputs)


def _producer(program: Program, name: str) -> str | None:
    """Who writes an existing variable: a call id, `<input>`, or None (no such variable)."""
    slot = program.variables.get(name)
    if slot is None:
        return None
    return slot.producer or "<input>"


def _reject_cycles(calls: list[CallSpec], new_outputs: dict[str, str]) -> None:
    # Edges into existing calls are impossible (they are already placed), so a cycle can
    # only lie among the new calls.
    graph = nx.DiGraph()
    graph.add_nodes_from(call.id for call in calls)
    for call in calls:
        for name in call.input_variables():
            producer = new_outputs.get(name)
            if producer is not None:
                graph.add_edge(producer, call.id)
        for parent in call.parents:
            if parent in graph:
                graph.add_edge(parent, call.id)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return
    names = " -> ".join([edge[0] for edge in cycle] + [cycle[0][0]])
    raise ProgramValidationError(f"calls form a cycle: {names}")


def dependency_ids(call: CallSpec, variables: Mapping[str, VariableSlot]) -> list[str]:
    """Ids of the calls `call` depends on: producers of its inputs, then its parents."""
    deps: list[str] = []
    for name in call.input_variables():
        slot = variables.get(name)
        if slot is not None and slot.producer is not None:
            deps.append(slot.producer)
    deps.extend(call.parents)
    return list(dict.fromkeys(deps))


def mark_urgent(call: CallNode) -> list[CallNode]:
    """Mark a latency-critical call and every call it waits on, transitively: the client
    awaits the output, so the whole chain leading to it is on its critical path. Returns
    the calls marked now (queued ones need their queue key refreshed)."""
    calls = call.program.calls
    marked: list[CallNode] = []
    stack = [call]
    while stack:
        node = stack.pop()
        if node.urgent or node.status >= CallStatus.FINISHED:
            continue
        node.urgent = True
        marked.append(node)
        stack.extend(calls[p] for p in node.parents if p in calls)
    return marked
