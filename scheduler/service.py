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
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import re
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import aclosing
from typing import Any, Protocol

from engine_backend.base import Engine
from engine_backend.errors import EngineError, EngineUnavailableError
from engine_backend.types import Chunk, FinishType, GenerateRequest

from .config import SchedulerConfig
from .dispatcher import Dispatcher, Replica, make_replicas
from .errors import (
    CallFailedError,
    ProgramCancelledError,
    ProgramNotFoundError,
    ProgramValidationError,
    SchedulerOverloadedError,
)
from .events import EventKind, Listener, SchedulerEvent
from .graph_prompt import fill, graph_llm_request
from .kv_admission import KvAdmission
from .policies import make_policy
from .program import (
    CALL_STATUS_NAMES,
    PROGRAM_STATUS_NAMES,
    CallNode,
    CallStatus,
    Program,
    ProgramStatus,
    VariableSlot,
    dependency_ids,
    mark_urgent,
    validate_new_calls,
)
from .replica_health import ReplicaHealth
from .retention import RetentionManager
from .router import Router
from .spec import CallSpec, ProgramSpec
from .store import CallRecord, InMemoryStateStore, StateStore
from .views import (
    CallState,
    ProgramHistoryState,
    ProgramState,
    ProgramSummary,
    ReplicaStats,
    SchedulerStats,
)

log = logging.getLogger(__name__)

__all__ = ["Scheduler", "ToolRunner"]


class EngineStreamEndedError(EngineUnavailableError):
    """An engine stream ended without a final chunk."""

    status_code = 502


class ToolRunner(Protocol):
    """What tool nodes go through (`scheduler.tools.ToolExecutor` implements it)."""

    def run(self, name: str, args: dict[str, Any], *, program_id: str, call_id: str) -> Any: ...


class Scheduler:
    def __init__(
        self,
        engines: Sequence[Engine],
        config: SchedulerConfig,
        *,
        store: StateStore | None = None,
        tools: ToolRunner | None = None,
    ) -> None:
        if not engines:
            raise ValueError("the scheduler needs at least one engine replica")
        self.config = config
        self.engines = list(engines)
        self.replicas: list[Replica] = make_replicas(self.engines, config)
        self.router = Router(config, self.replicas)
        self.policy = make_policy(config, prefix_hint=self.router.best_match)
        self.dispatcher = Dispatcher(
            config, self.replicas, self.policy, self.router, self._on_dispatch, self._on_queued
        )
        self.retention = RetentionManager(config, self.replicas)
        self.admission = KvAdmission(
            config, self.replicas,
            lambda call, since: self.dispatcher.enqueue(call, since, announce=False),
        )
        if config.preempt_without_priority:
            self.dispatcher.enable_preemption(self._abort_running)
        self.health = ReplicaHealth(
            config, self.replicas, on_down=self.dispatcher.evacuate,
            on_rejoin=lambda _replica: self.dispatcher.kick(), fail_queued=self._fail_queued,
        )
        self.store: StateStore = store if store is not None else InMemoryStateStore()
        self.tools = tools
        self._programs: dict[tuple[str, str], Program] = {}
        self._ended: deque[Program] = deque()
        self._listeners: list[tuple[Listener, frozenset[EventKind] | None]] = []
        self._wanted: frozenset[EventKind] = frozenset()
        self._program_seq = itertools.count()
        self._call_seq = itertools.count()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open_programs = 0
        self._started = False
        self.calls_finished = 0
        self.calls_failed = 0
        self._token_cost = (config.prefill_token_cost_s, config.decode_token_cost_s)
        self._engine_time_service = config.service_metric == "engine_time"
        self._preempt = config.preempt_without_priority

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        self.dispatcher.bind(self._loop)
        for engine in self.engines:
            await engine.start()
        for replica in self.replicas:
            try:  # the retention budget is a share of it
                stats = await asyncio.wait_for(replica.engine.stats(), 5.0)
                replica.kv_capacity = stats.kv_capacity_tokens
            except Exception:
                log.warning("no KV capacity from replica %d", replica.index, exc_info=True)
        self._started = True

    async def close(self) -> None:
        for program in list(self._programs.values()):
            if not program.is_closed:
                self._cancel_in_flight(program, "scheduler closing")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
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

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self.dispatcher.bind(self._loop)
        return self._loop

    # ------------------------------------------------------------------ programs
    async def submit_program(self, spec: ProgramSpec, *, tenant: str = "default") -> str:
        """Validate a whole graph, register it and start its ready calls."""
        program_id = spec.program_id or self._new_program_id()
        if (tenant, program_id) in self._programs:
            raise ProgramValidationError(f"program {program_id!r} already exists")
        program = self._new_program(program_id, tenant, metadata=spec.metadata)
        for name, value in spec.inputs.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
                raise ProgramValidationError(f"invalid input variable name {name!r}")
            slot = program.variables[name] = VariableSlot(name)
            slot.finish(value)
        validate_new_calls(
            program,
            spec.calls,
            max_calls=self.config.max_calls_per_program,
            tools_available=self.tools is not None,
        )
        await self._seed_history(program)
        self._register(program)
        self._add_graph_calls(program, spec.calls)
        return program_id

    async def add_calls(
        self, program_id: str, calls: list[CallSpec], *, tenant: str = "default"
    ) -> None:
        """Grow a running program's graph (dynamic programs)."""
        program = self._get(program_id, tenant)
        self._check_usable(program)
        validate_new_calls(
            program,
            calls,
            max_calls=self.config.max_calls_per_program,
            tools_available=self.tools is not None,
        )
        self._reopen(program)
        self._add_graph_calls(program, calls)

    async def open_program(self, program_id: str | None, *, tenant: str = "default") -> str:
        """Get or create a program (proxy style). `None` opens a single-call program that
        ends when its call finishes."""
        if program_id is None:
            program = self._new_program(self._new_program_id(), tenant, single_call=True)
            self._register(program)
            return program.id
        if not re.fullmatch(r"[A-Za-z0-9_.:\-]{1,128}", program_id):
            raise ProgramValidationError(
                f"invalid program id {program_id!r}: 1-128 of letters, digits, '_.:-'"
            )
        program = self._programs.get((tenant, program_id))
        if program is None:
            program = self._new_program(program_id, tenant)
            await self._seed_history(program)
            self._register(program)
        else:
            self._check_usable(program)
            self._reopen(program)
            # With a shared store another progserve replica may have served the program
            # since: rank its next call by the shared history (one lookup per call).
            await self._seed_history(program)
        return program.id

    async def end_program(self, program_id: str, *, tenant: str = "default") -> None:
        """The program is done: release its retained KV. Calls still in flight finish."""
        program = self._get(program_id, tenant)
        if not program.is_closed:
            self._close_program(program, ProgramStatus.FINISHED)

    async def cancel_program(self, program_id: str, *, tenant: str = "default") -> None:
        """Cancel everything queued or running in the program."""
        program = self._get(program_id, tenant)
        if program.status == ProgramStatus.CANCELLED:
            return
        self._cancel_in_flight(program, "program cancelled")
        self._close_program(program, ProgramStatus.CANCELLED)

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
    ) -> AsyncIterator[Chunk]:
        """Add one LLM call to the program and stream the engine's chunks.

        Checks run now (unknown program, bad parents, duplicate id: typed errors); the call
        is queued when iteration starts. Closing the iterator early aborts the engine
        request and frees the call. The scheduler sets the request's `priority` (when the
        engine honours one) and `program_id` (the cache owner for retention) in place.
        """
        program = self._get(program_id, tenant)
        self._check_usable(program)
        parents = tuple(parent_ids)
        for parent in parents:
            if parent not in program.calls:
                raise ProgramValidationError(f"unknown parent call {parent!r}")
        if call_id is not None and call_id in program.calls:
            raise ProgramValidationError(f"duplicate call id {call_id!r}")
        if len(program.calls) >= self.config.max_calls_per_program:
            raise ProgramValidationError(
                f"program {program.id!r} reached {self.config.max_calls_per_program} calls"
            )
        if self.queued() >= self.config.max_queued_calls:
            raise SchedulerOverloadedError("too many queued calls", retry_after=1.0)
        return self._proxy_stream(program, request, thread_id, parents, call_id)

    def _proxy_stream(
        self,
        program: Program,
        request: GenerateRequest,
        thread_id: str | None,
        parents: tuple[str, ...],
        call_id: str | None,
    ) -> AsyncIterator[Chunk]:
        def create() -> CallNode:
            # Runs at the first iteration: a stream nobody iterates never queues a call.
            self._reopen(program)
            if call_id is not None and call_id in program.calls:
                raise ProgramValidationError(f"duplicate call id {call_id!r}")
            call = self._new_call(
                program, call_id or program.next_call_id(), "llm", thread_id or "main", parents
            )
            call.request = request
            self._size_llm_call(call)
            self._enqueue(call)
            return call

        return self._execute_llm(create)

    # ------------------------------------------------------------------ variables
    async def wait_variable(
        self,
        program_id: str,
        name: str,
        *,
        tenant: str = "default",
        timeout: float | None = None,
    ) -> str:
        program = self._get(program_id, tenant)
        slot = self._slot(program, name)
        if not slot.done and slot.failed is None:
            await asyncio.wait_for(slot.event().wait(), timeout)
        if slot.failed is not None:
            raise slot.failed
        return "".join(slot.parts)

    async def stream_variable(
        self, program_id: str, name: str, *, tenant: str = "default"
    ) -> AsyncIterator[str]:
        program = self._get(program_id, tenant)
        slot = self._slot(program, name)
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

    def _slot(self, program: Program, name: str) -> VariableSlot:
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
        self._listeners.append((listener, None if kinds is None else frozenset(kinds)))
        self._refresh_wanted()

    def remove_listener(self, listener: Listener) -> None:
        self._listeners = [(f, k) for f, k in self._listeners if f is not listener]
        self._refresh_wanted()

    def _refresh_wanted(self) -> None:
        wanted: set[EventKind] = set()
        for _, kinds in self._listeners:
            wanted |= set(EventKind) if kinds is None else kinds
        self._wanted = frozenset(wanted)

    def program_state(self, program_id: str, *, tenant: str = "default") -> ProgramState:
        program = self._get(program_id, tenant)
        history = program.history
        return ProgramState(
            id=program.id,
            tenant=program.tenant,
            status=PROGRAM_STATUS_NAMES[program.status],  # type: ignore[arg-type]
            arrival=program.arrival,
            ended_at=program.ended_at,
            metadata=program.metadata,
            calls=[self._call_state(call) for call in program.calls.values()],
            variables={name: slot.value for name, slot in program.variables.items()},
            history=ProgramHistoryState(
                service=history.service,
                engine_time_s=history.engine_time_s,
                weighted_tokens=history.weighted_tokens,
                wait_s=history.wait_s,
                calls_finished=history.calls_finished,
                engines_used=sorted(history.engines_used),
                active_threads=sorted(history.active_threads),
            ),
            error=program.error,
        )

    @staticmethod
    def _call_state(call: CallNode) -> CallState:
        spec = call.spec
        return CallState(
            id=call.id,
            kind=call.kind,  # type: ignore[arg-type]
            status=CALL_STATUS_NAMES[call.status],  # type: ignore[arg-type]
            thread_id=call.thread_id,
            parents=list(call.parents),
            output=call.output,
            tool=spec.tool if spec is not None else None,
            replica=call.replica if call.replica >= 0 else None,
            priority=call.priority,
            queue_level=call.level,
            created_at=call.created_at,
            queued_at=_known(call.queued_at),
            dispatched_at=_known(call.dispatched_at),
            first_token_at=_known(call.first_token_at),
            finished_at=_known(call.finished_at),
            queue_wait_s=call.wait,
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
            cached_tokens=call.cached_tokens,
            service=call.service,
            preemptions=call.preemptions,
            error=call.error,
        )

    def list_programs(self, *, tenant: str | None = None) -> list[ProgramSummary]:
        return [
            ProgramSummary(
                id=p.id,
                tenant=p.tenant,
                status=PROGRAM_STATUS_NAMES[p.status],  # type: ignore[arg-type]
                arrival=p.arrival,
                ended_at=p.ended_at,
                calls=len(p.calls),
                calls_finished=p.history.calls_finished,
                service=p.history.service,
            )
            for p in self._programs.values()
            if tenant is None or p.tenant == tenant
        ]

    def _unqueue(self, call: CallNode) -> None:
        """Take a queued call out of wherever it waits (a queue, parked, or held)."""
        self.dispatcher.remove(call)
        self.admission.discard(call)

    def queued(self) -> int:
        """Calls waiting: in the policy's queue, parked for a replica, or held with their
        program for KV admission."""
        return self.dispatcher.queued() + self.admission.held_calls

    async def stats(self) -> SchedulerStats:
        by_status: dict[str, int] = {}
        for program in self._programs.values():
            name = PROGRAM_STATUS_NAMES[program.status]
            by_status[name] = by_status.get(name, 0) + 1
        return SchedulerStats(
            policy=self.policy.name,
            balance=self.config.balance,
            queued=self.queued(),
            queue_depth_by_level=self.policy.depth_by_level(),
            running=sum(r.inflight_requests for r in self.replicas),
            replicas=[
                ReplicaStats(
                    replica=r.index,
                    engine=getattr(r.engine, "name", type(r.engine).__name__),
                    inflight_requests=r.inflight_requests,
                    inflight_tokens=r.inflight_tokens,
                    dispatched=r.dispatched,
                    pending_affinity=len(r.parked),
                )
                for r in self.replicas
            ],
            programs_open=self._open_programs,
            programs_total=len(self._programs),
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

    # ================================================================== internals
    def _new_program_id(self) -> str:
        return f"prog-{uuid.uuid4().hex[:16]}"

    def _new_program(
        self,
        program_id: str,
        tenant: str,
        *,
        single_call: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> Program:
        if self._open_programs >= self.config.max_programs:
            raise SchedulerOverloadedError(
                f"{self._open_programs} programs are open (limit {self.config.max_programs})",
                retry_after=1.0,
            )
        now = self.loop.time()
        return Program(
            id=program_id,
            tenant=tenant,
            arrival=now,
            seq=next(self._program_seq),
            engine_key=program_id if tenant == "default" else f"{tenant}/{program_id}",
            single_call=single_call,
            metadata=dict(metadata or {}),
            idle_since=now,
        )

    def _register(self, program: Program) -> None:
        self._programs[(program.tenant, program.id)] = program
        self._open_programs += 1
        if EventKind.PROGRAM_STARTED in self._wanted:
            self._emit_program(EventKind.PROGRAM_STARTED, program)

    async def _seed_history(self, program: Program) -> None:
        """A program another progserve process has served keeps its history."""
        totals = await self.store.load(program.tenant, program.id)
        if totals is not None:
            history = program.history
            history.service = totals.service
            history.engine_time_s = totals.engine_time_s
            history.weighted_tokens = totals.weighted_tokens
            history.wait_s = totals.wait_s
            history.calls_finished = totals.calls_finished
            history.engines_used = set(totals.engines_used)

    def _get(self, program_id: str, tenant: str) -> Program:
        program = self._programs.get((tenant, program_id))
        if program is None:
            raise ProgramNotFoundError(program_id)
        return program

    @staticmethod
    def _check_usable(program: Program) -> None:
        if program.status == ProgramStatus.CANCELLED:
            raise ProgramCancelledError(program.id)

    def _reopen(self, program: Program) -> None:
        """A call arrives for an ended (not cancelled) program: it is open again."""
        if program.status in (ProgramStatus.FINISHED, ProgramStatus.FAILED):
            program.status = ProgramStatus.IDLE
            program.ended_at = None
            self._open_programs += 1
            if program in self._ended:
                self._ended.remove(program)

    def _new_call(
        self,
        program: Program,
        call_id: str,
        kind: str,
        thread: str,
        parents: tuple[str, ...],
        *,
        thread_parent: bool = True,
    ) -> CallNode:
        now = self.loop.time()
        if not parents and thread_parent:
            previous = program.last_call_by_thread.get(thread)
            if previous is not None:
                parents = (previous.id,)  # a thread is sequential
        call = CallNode(
            id=call_id,
            program=program,
            kind=kind,
            seq=next(self._call_seq),
            created_at=now,
            thread_id=thread,
            parents=parents,
        )
        program.calls[call_id] = call
        program.last_call_by_thread[thread] = call
        program.open_calls += 1
        program.history.thread_opened(thread)
        program.status = ProgramStatus.RUNNING
        return call

    def _size_llm_call(self, call: CallNode) -> None:
        request = call.request
        assert request is not None
        if request.input_ids is not None:
            prompt_len = len(request.input_ids)
        else:
            prompt_len = len(request.text or "") // self.config.chars_per_token + 1
        call.prompt_len = prompt_len
        call.budget_tokens = prompt_len + min(
            request.sampling.max_new_tokens, self.config.decode_reserve_tokens
        )

    def _enqueue(self, call: CallNode) -> None:
        loop = self.loop
        call.waiter = None
        call.replica = -1
        now = loop.time()
        if self.admission.admit(call, now):
            self.dispatcher.enqueue(call, now)
        else:
            self._on_queued(call)  # it waits from now, for admission first
        if call.status == CallStatus.QUEUED:  # not placed at once: its executor waits
            call.waiter = loop.create_future()

    def _on_queued(self, call: CallNode) -> None:
        if EventKind.CALL_QUEUED in self._wanted:
            self._emit_call(EventKind.CALL_QUEUED, call)

    def _on_dispatch(self, call: CallNode, replica: Replica, now: float) -> None:
        wait = now - call.queued_at
        call.wait += wait
        call.program.history.wait_s += wait
        call.program.running.add(call)
        if EventKind.CALL_DISPATCHED in self._wanted:
            self._emit_call(EventKind.CALL_DISPATCHED, call, queue_wait_s=wait)

    # ------------------------------------------------------------------ LLM execution
    def _engine_request(self, call: CallNode, replica: Replica) -> GenerateRequest:
        request = call.request
        assert request is not None
        priority = request.priority
        if self.config.pass_priority and replica.capabilities.priority:
            priority = self.policy.engine_priority(call)
        # The cache owner for retention hints; an untagged call's one-call program never
        # gets any, so engines need not track it.
        owner = None if call.program.single_call else call.program.engine_key
        if not call.preemptions:
            # Set in place: a copy per call costs more than the rest of dispatch.
            request.priority = priority
            request.program_id = owner
            return request
        update: dict[str, Any] = {"program_id": owner, "priority": priority}
        if call.preemptions:
            # Resume: the prompt plus the output so far, mostly served from the prefix cache.
            update["rid"] = f"{request.rid}~{call.preemptions}"
            sampling = request.sampling
            done = call.completion_tokens
            update["sampling"] = sampling.model_copy(
                update={
                    "max_new_tokens": max(sampling.max_new_tokens - done, 1),
                    "min_new_tokens": max(sampling.min_new_tokens - done, 0),
                }
            )
            if request.input_ids is not None:
                update["input_ids"] = request.input_ids + (call.output_ids or [])
            else:
                update["text"] = (request.text or "") + "".join(call.output_parts or ())
        return request.model_copy(update=update)

    async def _execute_llm(self, make_call: Callable[[], CallNode]) -> AsyncIterator[Chunk]:
        """Wait for a replica, stream from it, account for the call. Yields the engine's
        chunks; the final one's counters cover every attempt (after preemptions).
        `make_call` returns the (queued) call: proxy calls are created lazily by it."""
        call = make_call()
        program = call.program
        request = call.request
        assert request is not None
        keep_ids = request.input_ids is not None
        # The output so far is what a resume re-sends: after a preemption, or on another
        # replica after a failure (`_fail_over`).
        keep_text = self._preempt or (self.config.engine_retries > 0 and len(self.replicas) > 1)
        slot = program.variables.get(call.output) if call.output is not None else None
        choices = call.spec.choices if call.spec is not None else None
        stream_slot = slot if slot is not None and not choices else None
        output_ids: list[int] = call.output_ids if call.output_ids is not None else []
        call.output_ids = output_ids
        if (keep_text or choices) and call.output_parts is None:
            call.output_parts = []
        parts = call.output_parts
        outcome: CallStatus = CallStatus.CANCELLED
        error: BaseException | None = None
        loop = self.loop
        try:
            while True:
                if call.status == CallStatus.QUEUED:
                    assert call.waiter is not None
                    await call.waiter
                replica = self.replicas[call.replica]
                engine_request = self._engine_request(call, replica)
                preempted = failed_over = False
                attempt_start = loop.time()
                attempt_tokens = 0
                try:
                    stream = replica.engine.generate(engine_request)
                    try:  # not `aclosing`: its two coroutines per call show in benchmarks
                        async for chunk in stream:
                            attempt_tokens = max(attempt_tokens + len(chunk.token_ids),
                                                 chunk.completion_tokens)
                            if not call.prompt_tokens and chunk.prompt_tokens:
                                call.prompt_tokens = chunk.prompt_tokens
                            if call.first_token_at < 0:
                                call.first_token_at = loop.time()
                                if EventKind.CALL_FIRST_TOKEN in self._wanted:
                                    self._emit_call(EventKind.CALL_FIRST_TOKEN, call)
                            if keep_ids and chunk.token_ids:
                                output_ids.extend(chunk.token_ids)
                            if chunk.text:
                                if parts is not None:
                                    parts.append(chunk.text)
                                if stream_slot is not None:
                                    stream_slot.append(chunk.text)
                            reason = chunk.finish_reason
                            if reason is None:
                                yield chunk
                                continue
                            call.engine_time += loop.time() - attempt_start
                            if reason.type is FinishType.ABORT and call.preempt_requested:
                                preempted = True
                                if not call.prompt_tokens:
                                    call.prompt_tokens = chunk.prompt_tokens
                                call.completion_tokens += chunk.completion_tokens
                                call.cached_tokens += chunk.cached_tokens
                                # Its service so far ranks it when it queues again (demotion).
                                call.service += self._token_cost[1] * chunk.completion_tokens
                                break
                            self._account_final(call, chunk)
                            if slot is not None and choices and parts is not None:
                                slot.parts = [pick_choice("".join(parts), choices)]
                            outcome = (CallStatus.CANCELLED if reason.type is FinishType.ABORT
                                       else CallStatus.FINISHED)
                            # The answer first, the bookkeeping when the consumer moves on
                            # (or closes the stream): a proxy writes its response meanwhile.
                            try:
                                yield chunk
                            finally:
                                self.dispatcher.release(call)
                                if outcome == CallStatus.FINISHED:
                                    await self._record_service(call)
                                self._end_llm_call(call, replica, outcome, None)
                            return
                    finally:
                        await stream.aclose()
                    if not preempted:
                        raise EngineStreamEndedError(
                            f"engine stream of call {call.id!r} ended early")
                except EngineUnavailableError as exc:
                    if not self._fail_over(call, replica, exc, attempt_tokens):
                        raise
                    failed_over = True
                finally:
                    self.dispatcher.release(call)
                if not failed_over:
                    call.preempt_requested = False
                    if EventKind.CALL_PREEMPTED in self._wanted:
                        self._emit_call(EventKind.CALL_PREEMPTED, call)
                call.preemptions += 1
                self._enqueue(call)
        except EngineError as exc:
            outcome, error = CallStatus.FAILED, exc
            raise CallFailedError(program.id, call.id, call.output, exc) from exc
        except ProgramCancelledError as exc:
            outcome, error = CallStatus.CANCELLED, exc
            raise
        finally:
            if not call.done:
                self._end_llm_call(call, None, outcome, error)

    def _fail_over(
        self, call: CallNode, replica: Replica, exc: EngineUnavailableError, tokens: int
    ) -> bool:
        """The call's replica failed: take it out of rotation and, while retries remain and
        another replica is up, resume the call elsewhere with its prompt plus the output
        so far (the client's stream just continues). False: fail the call."""
        self.health.mark_down(replica, exc)
        if call.retries >= self.config.engine_retries or not self.health.any_up():
            return False
        call.retries += 1
        call.completion_tokens += tokens
        self.health.counters.failovers += 1
        log.warning("call %s of program %s: replica %d failed (%s); resuming on another "
                    "replica (retry %d)", call.id, call.program.id, replica.index,
                    type(exc).__name__, call.retries)
        return True

    @staticmethod
    def _account_final(call: CallNode, chunk: Chunk) -> None:
        """Fold the final chunk's counters into the call; after a resume, report the
        original prompt and every generated token to the client."""
        if call.preemptions:
            chunk.prompt_tokens = call.prompt_tokens or chunk.prompt_tokens
            call.completion_tokens += chunk.completion_tokens
            call.cached_tokens += chunk.cached_tokens
            chunk.completion_tokens = call.completion_tokens
        else:
            call.prompt_tokens = chunk.prompt_tokens
            call.completion_tokens = chunk.completion_tokens
            call.cached_tokens = chunk.cached_tokens

    async def _record_service(self, call: CallNode) -> None:
        """The call's service into the program's history (via the store), then re-rank."""
        prefill_cost, decode_cost = self._token_cost
        uncached = call.prompt_tokens - call.cached_tokens
        if uncached < 0:
            uncached = 0
        weighted = uncached * prefill_cost + call.completion_tokens * decode_cost
        service = call.engine_time if self._engine_time_service else weighted
        call.service = service
        program = call.program
        history = program.history
        totals = await self.store.record_call(
            program.tenant,
            program.id,
            CallRecord(service, call.engine_time, weighted, call.wait, call.replica),
        )
        history.service = totals.service
        history.engine_time_s = totals.engine_time_s
        history.weighted_tokens = totals.weighted_tokens
        history.wait_s = max(history.wait_s, totals.wait_s)
        history.calls_finished = totals.calls_finished
        history.engines_used = totals.engines_used
        self.policy.on_call_finished(call, self.loop.time())

    def _end_llm_call(
        self,
        call: CallNode,
        replica: Replica | None,
        status: CallStatus,
        error: BaseException | None,
    ) -> None:
        now = self.loop.time()
        if call.status == CallStatus.QUEUED:
            self._unqueue(call)
        waiter = call.waiter
        if waiter is not None and not waiter.done():
            waiter.cancel()
        self.dispatcher.release(call)
        if replica is not None and status == CallStatus.FINISHED:
            self.router.on_finish(call, replica, call.output_ids)
        call.output_ids = None
        call.output_parts = None
        call.request = None
        if replica is not None and status == CallStatus.FINISHED:
            self.retention.on_call_finished(
                call.program, replica, call.prompt_tokens + call.completion_tokens, now)
            self.admission.on_call_finished(call, now)
        self._end_call(call, status, error, now)

    # ------------------------------------------------------------------ call endings
    def _end_call(
        self, call: CallNode, status: CallStatus, error: BaseException | None, now: float
    ) -> None:
        """Common ending of every call: status, program bookkeeping, events, dependants.
        Dependants of a call that did not finish end with it, through a worklist rather
        than recursion: a deep chain (thousands of calls) must not exhaust the stack."""
        first = call
        pending: list[tuple[CallNode, CallStatus, BaseException | None]] = [
            (call, status, error)]
        while pending:
            call, status, error = pending.pop()
            if call is not first and call.status != CallStatus.PENDING:
                continue  # a dependant of two failed calls ends once
            call.status = status
            call.finished_at = now
            program = call.program
            program.running.discard(call)
            program.queued.discard(call)
            program.open_calls -= 1
            program.history.thread_closed(call.thread_id)
            if status == CallStatus.FINISHED:
                self.calls_finished += 1
                kind = EventKind.CALL_FINISHED if call.kind == "llm" else EventKind.TOOL_FINISHED
            else:
                if status == CallStatus.FAILED:
                    self.calls_failed += 1
                call.error = str(error) if error is not None else CALL_STATUS_NAMES[status]
                kind = EventKind.CALL_FAILED if call.kind == "llm" else EventKind.TOOL_FAILED
            if kind in self._wanted:
                self._emit_call(kind, call, error=call.error)
            if call.output is not None:
                slot = program.variables[call.output]
                if status == CallStatus.FINISHED:
                    slot.finish()
                else:
                    slot.fail(self._failure(call, error))
            for child in call.children:
                if child.status != CallStatus.PENDING:
                    continue
                if status == CallStatus.FINISHED:
                    child.unresolved -= 1
                    if child.unresolved == 0:
                        self._start_graph_call(child)
                else:
                    pending.append((
                        child,
                        CallStatus.FAILED if status == CallStatus.FAILED else CallStatus.CANCELLED,
                        self._failure(call, error),
                    ))
            if status == CallStatus.FAILED and program.error is None:
                program.error = call.error
            if program.open_calls == 0 and not program.is_closed:
                program.status = ProgramStatus.IDLE
                program.idle_since = now
                if program.single_call:
                    self._close_program(program, ProgramStatus.FINISHED)
                else:
                    self.retention.on_idle(program, now)
                    self._arm_idle_end(program, now + self.config.program_idle_timeout_s)

    def _arm_idle_end(self, program: Program, due: float) -> None:
        """Proxy clients rarely end their programs: one idle past the timeout ends by
        itself (a later call reopens it, with its history)."""
        if program.idle_timer is None:
            program.idle_timer = self.loop.call_at(due, self._idle_end, program)

    def _idle_end(self, program: Program) -> None:
        program.idle_timer = None
        if program.is_closed or program.open_calls:
            return  # its next idle moment re-arms the timer
        due = program.idle_since + self.config.program_idle_timeout_s
        if self.loop.time() >= due:
            self._close_program(program, ProgramStatus.FINISHED)
        else:
            self._arm_idle_end(program, due)

    def _failure(self, call: CallNode, error: BaseException | None) -> BaseException:
        if isinstance(error, CallFailedError | ProgramCancelledError):
            return error
        if call.status == CallStatus.CANCELLED:
            return ProgramCancelledError(call.program.id)
        return CallFailedError(call.program.id, call.id, call.output, error or "failed")

    # ------------------------------------------------------------------ graph calls
    def _add_graph_calls(self, program: Program, specs: Sequence[CallSpec]) -> None:
        producers: dict[str, str | None] = {
            name: slot.producer for name, slot in program.variables.items()
        }
        for spec in specs:
            if spec.output is not None:
                producers[spec.output] = spec.id
        new_calls: list[CallNode] = []
        for spec in specs:
            deps = tuple(dependency_ids(spec, producers))
            # Graph calls depend on their data flow only, never on a thread predecessor.
            call = self._new_call(
                program, spec.id, spec.kind, spec.thread_id or "main", deps, thread_parent=False
            )
            call.spec = spec
            call.output = spec.output
            if spec.output is not None:
                program.variables[spec.output] = VariableSlot(spec.output, producer=spec.id)
            call.status = CallStatus.PENDING
            new_calls.append(call)
        for call in new_calls:
            if call.spec is not None and call.spec.latency_critical:
                self._mark_urgent(call)
        for call in new_calls:
            for dep_id in call.parents:
                dep = program.calls[dep_id]
                if dep.status == CallStatus.FINISHED:
                    continue
                call.unresolved += 1
                dep.children.append(call)
        now = self.loop.time()
        for call in new_calls:
            if call.status != CallStatus.PENDING:
                continue
            failed = next(
                (
                    program.calls[d]
                    for d in call.parents
                    if program.calls[d].status in (CallStatus.FAILED, CallStatus.CANCELLED)
                ),
                None,
            )
            if failed is not None:
                self._end_call(call, CallStatus.FAILED, self._failure(failed, None), now)
            elif call.unresolved == 0:
                self._start_graph_call(call)

    def _mark_urgent(self, call: CallNode) -> None:
        now = self.loop.time()
        queue = getattr(self.policy, "heap", None)
        for node in mark_urgent(call):
            if queue is not None and node.heap is queue:  # re-key it in its queue
                self.policy.push(node, now)

    def _render(self, program: Program, template: str) -> str:
        return fill(template, program.variables)

    def _start_graph_call(self, call: CallNode) -> None:
        spec = call.spec
        assert spec is not None
        if spec.kind == "tool":
            call.task = self._spawn(self._run_tool(call))
            return
        try:  # its prompt filled in; messages rendered with the model's chat template
            call.request = graph_llm_request(call, self.replicas[0])
        except EngineError as exc:
            self._end_call(call, CallStatus.FAILED, exc, self.loop.time())
            return
        self._size_llm_call(call)
        self._enqueue(call)
        call.task = self._spawn(self._run_graph_llm(call))

    async def _run_graph_llm(self, call: CallNode) -> None:
        try:
            async with aclosing(self._execute_llm(lambda: call)) as stream:
                async for _ in stream:
                    pass
        except (CallFailedError, ProgramCancelledError):
            pass  # recorded on the call, its variable and its dependants

    async def _run_tool(self, call: CallNode) -> None:
        program = call.program
        spec = call.spec
        assert spec is not None and self.tools is not None
        now = self.loop.time()
        call.status = CallStatus.RUNNING
        call.dispatched_at = now
        program.running.add(call)
        if EventKind.TOOL_STARTED in self._wanted:
            self._emit_call(EventKind.TOOL_STARTED, call)
        args = {
            key: self._render(program, value) if isinstance(value, str) else value
            for key, value in spec.args.items()
        }
        try:
            result = self.tools.run(
                spec.tool or "", args, program_id=program.id, call_id=call.id
            )
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError:
            if not call.done:
                self._end_call(
                    call, CallStatus.CANCELLED, ProgramCancelledError(program.id), now
                )
            raise
        except Exception as exc:  # noqa: BLE001 - any tool failure fails this call only
            if not call.done:
                self._end_call(call, CallStatus.FAILED, exc, self.loop.time())
            return
        if call.done:
            return
        if call.output is not None:
            value = result if isinstance(result, str) else json.dumps(result, default=str)
            program.variables[call.output].parts = [value]
        call.engine_time = self.loop.time() - now
        self._end_call(call, CallStatus.FINISHED, None, self.loop.time())

    # ------------------------------------------------------------------ endings
    def _cancel_in_flight(self, program: Program, reason: str) -> None:
        now = self.loop.time()
        error = ProgramCancelledError(program.id)
        for call in list(program.calls.values()):
            if call.done:
                continue
            if call.status == CallStatus.RUNNING and call.kind == "llm":
                # The executor sees the abort finish and ends the call itself.
                replica = self.replicas[call.replica] if call.replica >= 0 else None
                request = call.request
                if replica is not None and request is not None:
                    rid = request.rid if not call.preemptions else f"{request.rid}~{call.preemptions}"
                    self._spawn(self._abort(replica, rid))
                continue
            if call.status == CallStatus.QUEUED:
                self._unqueue(call)
            waiter = call.waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
                continue  # its executor raises and ends the call
            if call.status == CallStatus.PENDING:
                self._end_call(call, CallStatus.CANCELLED, error, now)
            if call.kind == "tool" and call.task is not None:
                call.task.cancel()
        for slot in program.variables.values():
            if not slot.done and slot.failed is None:
                slot.fail(error)

    def _fail_queued(self, error: BaseException) -> int:
        """Fail every queued LLM call with `error` (every replica stayed down)."""
        failed = 0
        for program in list(self._programs.values()):
            for call in list(program.queued):
                waiter = call.waiter
                if waiter is not None and not waiter.done():
                    waiter.set_exception(error)  # its executor raises and ends the call
                    failed += 1
        return failed

    def _abort_running(self, call: CallNode) -> None:
        """Abort the engine request of a running call (its executor sees the abort)."""
        request = call.request
        if request is None or call.replica < 0:
            return
        rid = request.rid if not call.preemptions else f"{request.rid}~{call.preemptions}"
        self._spawn(self._abort(self.replicas[call.replica], rid))

    @staticmethod
    async def _abort(replica: Replica, rid: str) -> None:
        try:
            await replica.engine.abort(rid)
        except EngineError:
            pass  # already finished

    def _close_program(self, program: Program, status: ProgramStatus) -> None:
        now = self.loop.time()
        if not program.is_closed:
            self._open_programs -= 1
        program.status = status
        program.ended_at = now
        if program.idle_timer is not None:
            program.idle_timer.cancel()
            program.idle_timer = None
        self.retention.on_program_end(program)
        self.admission.on_program_end(program, now)
        self._spawn(self.store.end_program(program.tenant, program.id, PROGRAM_STATUS_NAMES[status]))
        if EventKind.PROGRAM_ENDED in self._wanted:
            self._emit_program(EventKind.PROGRAM_ENDED, program)
        self._ended.append(program)
        keep = self.config.keep_finished_programs
        while len(self._ended) > keep:
            old = self._ended.popleft()
            if old.is_closed and old.open_calls == 0:
                self._programs.pop((old.tenant, old.id), None)
                old.drop_calls()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ events
    def _emit(self, event: SchedulerEvent) -> None:
        for listener, kinds in self._listeners:
            if kinds is not None and event.kind not in kinds:
                continue
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a listener never breaks scheduling
                log.exception("scheduler listener failed")

    def _emit_call(
        self,
        kind: EventKind,
        call: CallNode,
        *,
        queue_wait_s: float | None = None,
        error: str | None = None,
    ) -> None:
        program = call.program
        dispatched = call.dispatched_at
        ttft = call.first_token_at - dispatched if call.first_token_at >= 0 else None
        duration = call.finished_at - dispatched if call.finished_at >= 0 <= dispatched else None
        self._emit(
            SchedulerEvent(
                kind=kind,
                time=self.loop.time(),
                program_id=program.id,
                tenant=program.tenant,
                call_id=call.id,
                thread_id=call.thread_id,
                call_kind=call.kind,
                tool=call.spec.tool if call.spec is not None else None,
                priority=call.priority,
                queue_level=call.level,
                replica=call.replica if call.replica >= 0 else None,
                queue_wait_s=queue_wait_s if queue_wait_s is not None else call.wait,
                ttft_s=ttft,
                duration_s=duration,
                prompt_tokens=call.prompt_tokens,
                completion_tokens=call.completion_tokens,
                cached_tokens=call.cached_tokens,
                service=call.service,
                error=error,
                parents=call.parents,
            )
        )

    def _emit_program(self, kind: EventKind, program: Program) -> None:
        self._emit(
            SchedulerEvent(
                kind=kind,
                time=self.loop.time(),
                program_id=program.id,
                tenant=program.tenant,
                service=program.history.service,
                status=PROGRAM_STATUS_NAMES[program.status],
                error=program.error,
            )
        )


def _known(t: float) -> float | None:
    return t if t >= 0 else None


def pick_choice(text: str, choices: list[str]) -> str:
    """The choice an unconstrained generation meant: an exact or prefix match first, then
    the choice sharing the longest common prefix with the text."""
    stripped = text.strip()
    for choice in choices:
        if stripped == choice:
            return choice
    for choice in choices:
        if stripped.startswith(choice) or (stripped and choice.startswith(stripped)):
            return choice

    def common(choice: str) -> int:
        n = 0
        for a, b in zip(choice, stripped, strict=False):
            if a != b:
                break
            n += 1
        return n

    best = max(choices, key=common)
    return best

