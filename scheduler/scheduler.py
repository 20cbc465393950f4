"""The scheduler's public face: programs in, engine streams out.

Two ways in, one path through:
- graph style (`submit_program`, `add_calls`): the DSL submits calls over semantic
  variables; a call starts when its inputs resolve, and its output fills its variable;
- proxy style (`open_program` + `llm_call`): an OpenAI or SGLang client sends one call at a
  time, tagged with a program (and thread and parents); the caller iterates the stream.

Either way an LLM call becomes a `CallNode` in the program's graph, waits in the policy's
queue, is placed on a replica by the dispatcher and router, and streams from the engine;
its service goes into the program's history (through the state store), which ranks the
program's later calls.

`Scheduler` wires the parts and holds none of their logic. Each idea has its module:
the program table (`program_table.py`), where calls wait (`call_queue.py`), the LLM-call
state machine (`call_runner.py`), graph calls and tool nodes (`dataflow.py`), call
endings and failure propagation (`call_endings.py`), cancellation (`cancellation.py`),
events (`events.py`) and state views (`views.py`). The parts call each other through
callbacks handed to them here, never back through the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from typing import Protocol

from engine_backend.base import Engine
from engine_backend.types import Chunk, GenerateRequest

from .call_endings import CallEndings
from .call_queue import CallQueue
from .call_runner import CallRunner
from .cancellation import Cancellation
from .config import CacheConfig, SchedulerConfig
from .dataflow import DataflowGraph, ToolRunner
from .errors import (
    CallExistsError,
    ProgramExistsError,
    ProgramValidationError,
    SchedulerOverloadedError,
)
from .events import EventBus, EventKind, Listener
from .loop_context import LoopContext
from .policies import make_policy
from .program import PROGRAM_STATUS_NAMES, CallNode, Program, ProgramStatus, VariableSlot
from .program import validate_new_calls as validate_calls
from .program_table import PROGRAM_ID, ProgramTable
from .replica import Replica, make_replicas
from .replica_health import ReplicaHealth
from .retention import RetentionManager
from .router import Router
from .spec import CallSpec, ProgramSpec
from .store import InMemoryStateStore, StateStore
from .tenant_calls import TenantCalls
from .views import (
    ProgramState,
    ProgramSummary,
    SchedulerStats,
    program_state,
    program_summary,
    replica_stats,
)

log = logging.getLogger(__name__)

__all__ = ["CallStream", "Scheduler", "ToolRunner"]

INPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


class CallStream(Protocol):
    """One proxied LLM call, as `Scheduler.llm_call` hands it out (the call runner's
    async generator, iterated directly: no layer per chunk). Iterate it for the engine's
    chunks (the last one has a finish reason and the call's totals); `aclose()` it to
    abort the call early, or to let go of it once answered. Nothing else is asked of the
    consumer: the scheduler frees the call's replica slot when the engine stream ends,
    and books the call itself (`call_runner.py`)."""

    def __aiter__(self) -> AsyncIterator[Chunk]: ...

    def __anext__(self) -> Awaitable[Chunk]: ...

    async def aclose(self) -> None: ...


class Scheduler:
    def __init__(
        self,
        engines: Sequence[Engine],
        config: SchedulerConfig,
        *,
        store: StateStore | None = None,
        tools: ToolRunner | None = None,
        cache: CacheConfig | None = None,
    ) -> None:
        if not engines:
            raise ValueError("the scheduler needs at least one engine replica")
        self.config = config
        self.cache_config = cache if cache is not None else CacheConfig()
        self.tenant_calls = TenantCalls()  # open LLM calls per tenant; admission's hook
        self.engines = list(engines)
        self.store: StateStore = store if store is not None else InMemoryStateStore()
        self.tools = tools
        self._loop = LoopContext(on_bind=self._bind)
        self.bus = EventBus(self._loop)
        self.replicas: list[Replica] = make_replicas(self.engines, config)
        self.router = Router(config, self.replicas)
        self.policy = make_policy(config, self.router)
        self.queue = CallQueue(config, self._loop, self.bus, self.replicas, self.policy,
                               self.router)
        self.dispatcher = self.queue.dispatcher
        self.admission = self.queue.admission
        self.retention = RetentionManager(config, self.replicas)
        self.programs = ProgramTable(config, self._loop, self.bus, self.store,
                                     self.retention, self.admission, self.cache_config,
                                     self.tenant_calls)
        self.endings = CallEndings(self.bus, self.programs, self._start_ready)
        self.cancellation = Cancellation(self._loop, self.replicas, self.queue, self.endings)
        if config.preempt_without_priority:
            self.dispatcher.enable_preemption(self.cancellation.abort_running)
        self.health = ReplicaHealth(
            config, self.replicas, on_down=self.dispatcher.evacuate,
            on_rejoin=lambda _replica: self.dispatcher.kick(), fail_queued=self._fail_queued,
        )
        self.runner = CallRunner(config, self._loop, self.bus, self.replicas, self.policy,
                                 self.queue, self.router, self.retention, self.health,
                                 self.store, self.endings)
        self.dataflow = DataflowGraph(self._loop, self.bus, self.programs, self.queue,
                                      self.runner, self.endings, self.policy, self.replicas,
                                      tools)
        self._started = False

    # ------------------------------------------------------------------ wiring
    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.dispatcher.bind(loop)

    def _start_ready(self, call: CallNode) -> None:
        self.dataflow.start(call)

    def _book_answered(self) -> None:
        """Whoever reads or changes a program finds its answered calls booked."""
        if self.runner.answered:
            self.runner.book_answered()

    def _fail_queued(self, error: BaseException) -> int:
        return self.cancellation.fail_queued(self.programs, error)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop.loop

    @property
    def calls_finished(self) -> int:
        return self.endings.calls_finished

    @property
    def calls_failed(self) -> int:
        return self.endings.calls_failed

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._started:
            return
        self._loop.bind(asyncio.get_running_loop())
        for engine in self.engines:
            await engine.start()
        for replica in self.replicas:
            # What an HTTP engine can do is known once it has probed its upstream.
            replica.capabilities = replica.engine.capabilities()
            try:  # the retention budget is a share of it
                stats = await asyncio.wait_for(replica.engine.stats(), 5.0)
                replica.kv_capacity = stats.kv_capacity_tokens
            except Exception:
                log.warning("no KV capacity from replica %d", replica.index, exc_info=True)
        self._started = True

    async def close(self) -> None:
        self._book_answered()
        for program in list(self.programs):
            if not program.is_closed:
                self.cancellation.cancel_in_flight(program)
        await self._loop.cancel_tasks()
        await self.retention.close()
        self.admission.close()
        await self.health.close()
        for engine in self.engines:
            await engine.close()
        await self.store.close()
        self._started = False

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ programs
    async def submit_program(self, spec: ProgramSpec, *, tenant: str = "default") -> str:
        """Validate a whole graph, register it and start its ready calls."""
        programs = self.programs
        program_id = spec.program_id or programs.new_id()
        if (tenant, program_id) in programs:
            raise ProgramExistsError(f"program {program_id!r} already exists")
        program = programs.new_program(program_id, tenant, metadata=spec.metadata)
        for name, value in spec.inputs.items():
            if not INPUT_NAME.fullmatch(name):
                raise ProgramValidationError(f"invalid input variable name {name!r}")
            slot = program.variables[name] = VariableSlot(name)
            slot.finish(value)
        self._validate(program, spec.calls)
        await programs.seed_history(program)
        self.tenant_calls.admit(tenant, _llm_calls(spec.calls))
        programs.register(program)
        self.dataflow.add_calls(program, spec.calls)
        return program_id

    async def add_calls(
        self, program_id: str, calls: list[CallSpec], *, tenant: str = "default"
    ) -> None:
        """Grow a running program's graph (dynamic programs)."""
        program = self.programs.get(program_id, tenant)
        self.programs.check_usable(program)
        self._validate(program, calls)
        self.tenant_calls.admit(tenant, _llm_calls(calls))
        self.programs.reopen(program)
        self.dataflow.add_calls(program, calls)

    def _validate(self, program: Program, calls: Sequence[CallSpec]) -> None:
        validate_calls(program, calls, max_calls=self.config.max_calls_per_program,
                       tools_available=self.tools is not None)

    async def open_program(self, program_id: str | None, *, tenant: str = "default") -> str:
        """Get or create a program (proxy style). `None` opens a single-call program that
        ends when its call finishes."""
        programs = self.programs
        if program_id is None:
            program = programs.new_program(programs.new_id(), tenant, single_call=True)
            programs.register(program)
            return program.id
        if not PROGRAM_ID.fullmatch(program_id):
            raise ProgramValidationError(
                f"invalid program id {program_id!r}: 1-128 of letters, digits, '_.:-'"
            )
        program = programs.find(program_id, tenant)
        if program is None:
            program = programs.new_program(program_id, tenant)
            await programs.seed_history(program)
            programs.register(program)
        else:
            programs.check_usable(program)
            if self.runner.answered:  # its last call counts before the next one ranks
                self.runner.book_answered()
            programs.reopen(program)
            # With a shared store another progserve replica may have served the program
            # since: rank its next call by the shared history (one lookup per call).
            await programs.seed_history(program)
        return program.id

    async def end_program(self, program_id: str, *, tenant: str = "default") -> None:
        """The program is done: release its retained KV. Calls still in flight finish."""
        program = self.programs.get(program_id, tenant)
        self._book_answered()  # its answered calls end before it does
        if not program.is_closed:
            self.programs.close(program, ProgramStatus.FINISHED)

    async def cancel_program(self, program_id: str, *, tenant: str = "default") -> None:
        """Cancel everything queued or running in the program."""
        program = self.programs.get(program_id, tenant)
        if program.status == ProgramStatus.CANCELLED:
            return
        self._book_answered()
        self.cancellation.cancel_in_flight(program)
        self.programs.close(program, ProgramStatus.CANCELLED)

    # ------------------------------------------------------------------ proxy calls
    def llm_call(
        self,
        program_id: str,
        request: GenerateRequest,
        *,
        tenant: str = "default",
        thread_id: str | None = None,
        parent_ids: Sequence[str] = (),
        call_id: str | None = None,
    ) -> CallStream:
        """Add one LLM call to the program and stream the engine's chunks.

        Checks run now (unknown program, bad parents, duplicate id: typed errors); the call
        is queued when iteration starts. Closing the stream early aborts the engine
        request and frees the call. The scheduler sets the request's `priority` (when the
        engine honours one) and `program_id` (the cache owner for retention) in place.
        """
        program = self.programs.get(program_id, tenant)
        self.programs.check_usable(program)
        parents = tuple(parent_ids)
        for parent in parents:
            if parent not in program.calls:
                raise ProgramValidationError(f"unknown parent call {parent!r}")
        if call_id is not None and call_id in program.calls:
            raise CallExistsError(f"program {program.id!r} already has a call {call_id!r}")
        if len(program.calls) >= self.config.max_calls_per_program:
            raise ProgramValidationError(
                f"program {program.id!r} reached {self.config.max_calls_per_program} calls"
            )
        if self.queued() >= self.config.max_queued_calls:
            raise SchedulerOverloadedError("too many queued calls", retry_after=1.0)

        def create() -> CallNode:
            # Runs at the first iteration: a stream nobody iterates never queues a call.
            # Looked up again: an ended program may have been packed since (a new object).
            program = self.programs.get(program_id, tenant)
            try:
                self.tenant_calls.admit(program.tenant, 1)
            except Exception:
                self.programs.refused_call(program)
                raise
            self.programs.reopen(program)
            if call_id is not None and call_id in program.calls:
                raise CallExistsError(f"program {program.id!r} already has a call {call_id!r}")
            call = self.programs.new_call(
                program, call_id or program.next_call_id(), "llm", thread_id or "main", parents
            )
            call.request = request
            self.queue.size(call)
            self.queue.enqueue(call)
            return call

        return self.runner.stream(create)

    # ------------------------------------------------------------------ variables
    async def wait_variable(
        self,
        program_id: str,
        name: str,
        *,
        tenant: str = "default",
        timeout: float | None = None,
    ) -> str:
        slot = self._slot(self.programs.get(program_id, tenant), name)
        if not slot.done and slot.failed is None:
            await asyncio.wait_for(slot.event().wait(), timeout)
        if slot.failed is not None:
            raise slot.failed
        return "".join(slot.parts)

    async def stream_variable(
        self, program_id: str, name: str, *, tenant: str = "default"
    ) -> AsyncIterator[str]:
        slot = self._slot(self.programs.get(program_id, tenant), name)
        queue = slot.subscribe()
        try:
            while True:
                delta = await queue.get()
                if delta is None:
                    break
                yield delta
        finally:
            slot.unsubscribe(queue)
        if slot.failed is not None:
            raise slot.failed

    @staticmethod
    def _slot(program: Program, name: str) -> VariableSlot:
        slot = program.variables.get(name)
        if slot is None:
            raise ProgramValidationError(f"program {program.id!r} has no variable {name!r}")
        return slot

    # ------------------------------------------------------------------ introspection
    def add_listener(
        self, listener: Listener, kinds: Iterable[EventKind] | None = None
    ) -> None:
        """Call `listener` on every event, or only on events of `kinds` (cheaper: events
        nobody wants are never built)."""
        self.bus.add(listener, kinds)

    def remove_listener(self, listener: Listener) -> None:
        self.bus.remove(listener)

    def program_state(self, program_id: str, *, tenant: str = "default") -> ProgramState:
        self._book_answered()
        return program_state(self.programs.get(program_id, tenant))

    def list_programs(self, *, tenant: str | None = None) -> list[ProgramSummary]:
        self._book_answered()
        return [program_summary(p) for p in self.programs
                if tenant is None or p.tenant == tenant]

    def queued(self) -> int:
        """Calls waiting: in the policy's queue, parked for a replica, or held with their
        program for KV admission."""
        return self.dispatcher.queued() + self.admission.held_calls

    def stalled_for(self) -> float:
        """Seconds calls have waited in the queue while no call was dispatched or ended
        (0 while nothing waits): past `stall_timeout_s`, `/health` says the scheduler is
        wedged. A scan of the programs: for health checks, not the hot path."""
        if not self.dispatcher.queued():
            return 0.0
        waiting = self.queue.waiting_since(self.programs)
        if waiting is None:
            return 0.0
        moved = max(waiting, self.queue.last_dispatch_at, self.endings.last_end_at)
        return max(0.0, self._loop.time() - moved)

    async def stats(self) -> SchedulerStats:
        self._book_answered()
        by_status: dict[str, int] = {}
        for program in self.programs:
            name = PROGRAM_STATUS_NAMES[program.status]
            by_status[name] = by_status.get(name, 0) + 1
        return SchedulerStats(
            policy=self.policy.name,
            balance=self.config.balance,
            queued=self.queued(),
            queue_depth_by_level=self.policy.depth_by_level(),
            running=sum(r.inflight_requests for r in self.replicas),
            replicas=[replica_stats(r) for r in self.replicas],
            programs_open=self.programs.open_count,
            programs_total=len(self.programs),
            programs_by_status=by_status,
            calls_dispatched=self.dispatcher.dispatched,
            calls_finished=self.calls_finished,
            calls_failed=self.calls_failed,
            preemptions=self.dispatcher.preemptions,
            promotions=self.policy.promotions,
            retained_programs=len(self.retention.retained),
            admission_held_programs=len(self.admission.held),
            admission_kv_demand_tokens=round(self.admission.demand),
        )


def _llm_calls(specs: Sequence[CallSpec]) -> int:
    return sum(1 for spec in specs if spec.kind == "llm")
