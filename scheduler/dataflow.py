"""Graph calls: the data-flow graph of a submitted program, and its tool nodes.

A graph call (the DSL's, or the native API's) depends on the calls that write the
variables its prompt or arguments read, and on its declared parents. It starts when the
last of them finishes (`CallEndings` counts them down): an LLM call gets its prompt
rendered from the variables and queues like any other (`start`, `_request`); a tool call
runs through the tool executor, which only runs tools registered by name."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Coroutine, Sequence
from contextlib import aclosing
from typing import Any, Protocol

from engine_backend.errors import EngineError

from .call_endings import CallEndings, failure
from .call_queue import CallQueue
from .call_runner import CallRunner
from .errors import CallFailedError, ProgramCancelledError
from .events import EventBus, EventKind
from .graph_prompt import fill, graph_llm_request
from .loop_context import LoopContext
from .policies import Policy
from .program import CallNode, CallStatus, Program, VariableSlot, dependency_ids, mark_urgent
from .program_table import ProgramTable
from .replica import Replica
from .spec import CallSpec


class ToolRunner(Protocol):
    """What tool nodes go through (`scheduler.tools.ToolExecutor` implements it)."""

    def run(self, name: str, args: dict[str, Any], *, program_id: str, call_id: str) -> Any: ...


class DataflowGraph:
    def __init__(
        self,
        loop: LoopContext,
        bus: EventBus,
        programs: ProgramTable,
        queue: CallQueue,
        runner: CallRunner,
        endings: CallEndings,
        policy: Policy,
        replicas: list[Replica],
        tools: ToolRunner | None,
    ) -> None:
        self.loop = loop
        self.bus = bus
        self.programs = programs
        self.queue = queue
        self.runner = runner
        self.endings = endings
        self.policy = policy
        self.replicas = replicas
        self.tools = tools

    def add_calls(self, program: Program, specs: Sequence[CallSpec]) -> None:
        """Add validated calls to the program's graph; start those already ready."""
        new_calls = self._new_calls(program, specs)
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
                self.endings.end(call, CallStatus.FAILED, failure(failed, None), now)
            elif call.unresolved == 0:
                self.start(call)

    def _new_calls(self, program: Program, specs: Sequence[CallSpec]) -> list[CallNode]:
        for spec in specs:  # first, so a call may read a variable written later in the batch
            if spec.output is not None:
                program.variables[spec.output] = VariableSlot(spec.output, producer=spec.id)
        new_calls: list[CallNode] = []
        for spec in specs:
            deps = tuple(dependency_ids(spec, program.variables))
            # Graph calls depend on their data flow only, never on a thread predecessor.
            call = self.programs.new_call(
                program, spec.id, spec.kind, spec.thread_id or "main", deps, thread_parent=False
            )
            call.spec = spec
            call.output = spec.output
            call.status = CallStatus.PENDING
            new_calls.append(call)
        return new_calls

    def _mark_urgent(self, call: CallNode) -> None:
        now = self.loop.time()
        for node in mark_urgent(call):
            if node.status == CallStatus.QUEUED:
                self.policy.rekey(node, now)

    # ------------------------------------------------------------------ starting calls
    def start(self, call: CallNode) -> None:
        """A call whose inputs all resolved: run it."""
        spec = call.spec
        assert spec is not None
        if spec.kind == "tool":
            self._spawn_call(call, self._run_tool(call))
            return
        try:  # its prompt filled in; messages rendered with the model's chat template
            call.request = graph_llm_request(call, self.replicas[0])
        except EngineError as exc:
            self.endings.end(call, CallStatus.FAILED, exc, self.loop.time())
            return
        self.queue.size(call)
        self.queue.enqueue(call)
        self._spawn_call(call, self._run_llm(call))

    def _spawn_call(self, call: CallNode, coro: Coroutine[Any, Any, None]) -> None:
        """A graph call's task. The call forgets it once done: a kept finished program
        would otherwise hold every call's task, coroutine and context."""
        task = call.task = self.loop.spawn(coro)

        def forget(done: asyncio.Task[Any]) -> None:
            if call.task is done:
                call.task = None

        task.add_done_callback(forget)

    async def _run_llm(self, call: CallNode) -> None:
        try:
            async with aclosing(self.runner.stream(lambda: call)) as stream:
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
        if EventKind.TOOL_STARTED in self.bus.wanted:
            self.bus.call_event(EventKind.TOOL_STARTED, call)
        args = {
            key: fill(value, program.variables) if isinstance(value, str) else value
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
                self.endings.end(
                    call, CallStatus.CANCELLED, ProgramCancelledError(program.id), now
                )
            raise
        except Exception as exc:  # noqa: BLE001 - any tool failure fails this call only
            if not call.done:
                self.endings.end(call, CallStatus.FAILED, exc, self.loop.time())
            return
        if call.done:
            return
        if call.output is not None:
            value = result if isinstance(result, str) else json.dumps(result, default=str)
            program.variables[call.output].parts = [value]
        call.engine_time = self.loop.time() - now
        self.endings.end(call, CallStatus.FINISHED, None, self.loop.time())
