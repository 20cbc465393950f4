"""The state of one running program: its graph, its runtime, and the await protocol.

The primitives (`gen`, `tool`, ...) find the running program through a `ContextVar`, the
asyncio-native way to carry per-task context: each `Program.run` sets it, tasks the
program spawns inherit it, and nothing is shared between concurrent programs.

Awaiting a variable is where the DSL talks to the scheduler: it first sends every call
created since the last await in one batch (the first batch submits the program), marking
the awaited variable's call latency-critical, then waits for the value.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from scheduler.spec import CallSpec, ProgramSpec

from .errors import (
    CallFailedError,
    DSLError,
    NoActiveProgramError,
    ProgramDefinitionError,
)
from .graph import CallRecord, ProgramGraph
from .roles import CallPrompt
from .runtime import Runtime
from .templates import render
from .variables import JoinedVariables, SemanticVariable

_CURRENT: ContextVar[ProgramContext | None] = ContextVar("frontend_lang_program", default=None)
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def current_context() -> ProgramContext:
    context = _CURRENT.get()
    if context is None:
        raise NoActiveProgramError(
            "gen / select / tool / fork / let must be called inside an @program function "
            "that runs with `await my_program.run(runtime, ...)`"
        )
    return context


def caller_site() -> str:
    """`file.py:line` of the first frame outside this package: where the user's program
    created a call."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return ""
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


@dataclass(slots=True)
class ClientToolTiming:
    call_id: str
    started_at: float
    finished_at: float | None = None


class ProgramContext:
    def __init__(self, runtime: Runtime, program_id: str, metadata: dict[str, str]) -> None:
        self.runtime = runtime
        self.program_id = program_id
        self.metadata = metadata
        self.submitted = False
        self.graph = ProgramGraph()
        self.client_timings: list[ClientToolTiming] = []
        self._send_lock = asyncio.Lock()
        self._client_tasks: dict[str, asyncio.Task[str]] = {}  # variable -> running tool
        self._background: set[asyncio.Task[None]] = set()
        self._values: dict[str, str] = {}  # values already fetched or computed
        self._raised: set[str] = set()  # failed variables whose error the program was given
        self._threads = 0

    # -- entering and leaving ----------------------------------------------------------
    def activate(self) -> object:
        return _CURRENT.set(self)

    @staticmethod
    def deactivate(token: object) -> None:
        _CURRENT.reset(token)  # type: ignore[arg-type]

    def new_thread_id(self) -> str:
        self._threads += 1
        return f"thread_{self._threads}"

    # -- creating calls (never blocks) -------------------------------------------------
    def add_llm_call(
        self,
        *,
        kind: str,
        prompt: CallPrompt,
        name: str | None,
        sampling: dict[str, Any],
        choices: list[str] | None = None,
        thread_id: str | None = None,
        priority_hint: float | None = None,
        parents: list[str] | None = None,
        site: str,
    ) -> SemanticVariable:
        call_id = self.graph.new_call_id(kind)
        output = self.graph.new_variable_name(name, call_id)
        spec = self._spec(
            call_id,
            site,
            kind="llm",
            output=output,
            **prompt.spec_fields(),
            sampling=sampling,
            choices=choices,
            thread_id=thread_id,
            priority_hint=priority_hint,
            parents=parents or [],
        )
        return self._register(CallRecord(spec, site))

    def add_tool_call(
        self,
        *,
        tool: str,
        args: dict[str, Any],
        name: str | None,
        thread_id: str | None = None,
        priority_hint: float | None = None,
        site: str,
    ) -> SemanticVariable:
        call_id = self.graph.new_call_id("tool")
        output = self.graph.new_variable_name(name, call_id)
        spec = self._spec(
            call_id,
            site,
            kind="tool",
            tool=tool,
            args=args,
            output=output,
            thread_id=thread_id,
            priority_hint=priority_hint,
        )
        return self._register(CallRecord(spec, site))

    def add_client_tool(
        self,
        fn: Callable[..., Any],
        *,
        args: dict[str, Any],
        templates: dict[str, Any],
        name: str | None,
        site: str,
    ) -> SemanticVariable:
        """A Python callable that runs here, in the DSL runtime, once its argument
        variables have values (`templates`: the same arguments with variables as
        placeholders, which give the call's inputs). Its result is a variable like any
        other."""
        call_id = self.graph.new_call_id("tool")
        fn_name = getattr(fn, "__name__", "")
        default = fn_name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", fn_name) else None
        output = self.graph.new_variable_name(name or default, call_id)
        tool_name = (fn_name or type(fn).__name__)[:128]
        spec = self._spec(call_id, site, kind="tool", tool=tool_name, args=templates, output=output)
        record = CallRecord(spec, site, client_tool=fn)
        self.graph.check_references(record)  # its inputs must exist now: it starts now
        variable = self._register(record)
        task = asyncio.create_task(self._run_client_tool(record, args), name=f"tool:{call_id}")
        task.add_done_callback(self._on_client_tool_done)
        self._client_tasks[output] = task
        return variable

    def add_input(self, value: str, name: str | None, site: str) -> SemanticVariable:
        if not isinstance(value, str):
            raise ProgramDefinitionError(
                f"let() at {site}: a program input must be a string, not {type(value).__name__}"
            )
        variable_name = self.graph.new_variable_name(name, "input")
        self.graph.add_input(variable_name, value)
        self._values[variable_name] = value
        return SemanticVariable(variable_name, None, self)

    def _spec(self, call_id: str, site: str, **fields: Any) -> CallSpec:
        try:
            return CallSpec(id=call_id, **fields)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise ProgramDefinitionError(f"call {call_id!r} at {site}: {problems}") from None

    def _register(self, record: CallRecord) -> SemanticVariable:
        self.graph.add_call(record)
        assert record.spec.output is not None
        return SemanticVariable(record.spec.output, record.spec.id, self)

    # -- sending the graph -------------------------------------------------------------
    async def flush(self) -> None:
        """Send every call that can be sent now, as one batch."""
        async with self._send_lock:
            first = not self.submitted
            if first:
                self.graph.server_inputs = set(self.graph.inputs)
            batch = self.graph.take_sendable(self._client_values())
            if not batch:
                if first:
                    self.graph.server_inputs = set()
                return
            try:
                if first:
                    spec = ProgramSpec(
                        program_id=self.program_id,
                        inputs=dict(self.graph.inputs),
                        calls=batch,
                        metadata=self.metadata,
                    )
                    await self.runtime.submit_program(spec)
                    self.submitted = True
                else:
                    await self.runtime.add_calls(self.program_id, batch)
            except BaseException:
                for spec in batch:  # not on the server: send them again next time
                    self.graph.calls[spec.id].sent = False
                if first:
                    self.graph.server_inputs = set()
                raise

    def _client_values(self) -> dict[str, str]:
        values = {
            name: value
            for name, value in self.graph.inputs.items()
            if name not in self.graph.server_inputs
        }
        for name, task in self._client_tasks.items():
            if task.done() and not task.cancelled() and task.exception() is None:
                values[name] = task.result()
        return values

    def _on_client_tool_done(self, task: asyncio.Task[str]) -> None:
        # Calls held back on this tool's value can go now, even while the program
        # awaits something else.
        if task.cancelled() or not self.graph.pending():
            return
        flush = asyncio.create_task(self._background_flush())
        self._background.add(flush)
        flush.add_done_callback(self._background.discard)

    async def _background_flush(self) -> None:
        try:
            await self.flush()
        except DSLError:
            pass  # deterministic: the program's next await raises the same error

    # -- awaiting ----------------------------------------------------------------------
    async def value_of(self, variable: SemanticVariable) -> str:
        self._check_owner(variable)
        return await self._value(variable.name)

    async def values_of(self, variables: Iterable[SemanticVariable]) -> list[str]:
        variables = list(variables)
        for variable in variables:
            self._check_owner(variable)
            self.graph.mark_latency_critical(variable.name)
        await self.flush()
        return list(await asyncio.gather(*(self._value(v.name) for v in variables)))

    async def stream_of(self, variable: SemanticVariable) -> AsyncIterator[str]:
        self._check_owner(variable)
        name = variable.name
        if name in self._values or name in self._client_tasks:
            yield await self._value(name)
            return
        self.graph.mark_latency_critical(name)
        await self._send_producer(name)
        parts: list[str] = []
        async for delta in self.runtime.stream_variable(self.program_id, name):
            parts.append(delta)
            yield delta
            # Each step of a stream is an await point: calls the program created while
            # reading this delta (an LLMCompiler task, say) go out now, not at the end.
            await self.flush()
        self._values[name] = "".join(parts)

    async def _value(self, name: str) -> str:
        if name in self._values:
            return self._values[name]
        task = self._client_tasks.get(name)
        try:
            if task is not None:
                value = await asyncio.shield(task)
            else:
                self.graph.mark_latency_critical(name)
                await self._send_producer(name)
                value = await self._wait_server(name)
        except CallFailedError:
            self._raised.add(name)  # the program saw it (and may have handled it)
            raise
        self._values[name] = value
        return value

    async def _wait_server(self, name: str) -> str:
        try:
            return await self.runtime.wait_variable(self.program_id, name)
        except CallFailedError as exc:
            failed = self._with_site(exc)
            record = self.graph.producer_of(name)
            if record is None or record.spec.id == exc.call_id:
                raise failed from exc
            # A dependant: name the variable awaited and its call, then the root cause.
            raise CallFailedError(
                self.program_id, record.spec.id, name, f"an input failed: {failed}", record.site
            ) from exc

    def _with_site(self, exc: CallFailedError) -> CallFailedError:
        record = self.graph.calls.get(exc.call_id)
        if exc.site is not None or record is None:
            return exc
        return CallFailedError(exc.program_id, exc.call_id, exc.variable, exc.cause, record.site)

    async def _send_producer(self, name: str) -> None:
        """Flush until the call producing `name` is on the server; while it is held back
        on client-side tools, wait for them (their failure fails it)."""
        record = self.graph.producer_of(name)
        assert record is not None and record.client_tool is None
        while True:
            await self.flush()
            if record.sent:
                return
            blockers = self._client_blockers(record)
            if not blockers:  # cannot happen: a held-back call always waits on a tool
                raise ProgramDefinitionError(f"call {record.spec.id!r} can never be sent")
            for blocker, task in blockers:
                try:
                    await asyncio.shield(task)
                except CallFailedError as exc:
                    raise CallFailedError(
                        self.program_id,
                        record.spec.id,
                        name,
                        f"its input {blocker!r} failed: {exc}",
                        record.site,
                    ) from exc

    def _client_blockers(self, record: CallRecord) -> list[tuple[str, asyncio.Task[str]]]:
        """Client tools, not finished, that `record` waits on (directly or through other
        calls held back)."""
        found: dict[str, asyncio.Task[str]] = {}
        stack, seen = [record], set()
        while stack:
            current = stack.pop()
            for name in current.spec.input_variables():
                if name in self._client_tasks:
                    task = self._client_tasks[name]
                    if not task.done() or task.cancelled() or task.exception() is not None:
                        found[name] = task
                    continue
                producer = self.graph.producer_of(name)
                if producer is not None and not producer.sent and producer.spec.id not in seen:
                    seen.add(producer.spec.id)
                    stack.append(producer)
        return list(found.items())

    def _check_owner(self, variable: SemanticVariable) -> None:
        running = _CURRENT.get()
        if variable._context is not self or (running is not None and running is not self):
            raise ProgramDefinitionError(
                f"variable {variable.name!r} belongs to another program run: pass values "
                f"between programs with `await`, not variable handles"
            )

    # -- client-side tools -------------------------------------------------------------
    async def _run_client_tool(self, record: CallRecord, args: dict[str, Any]) -> str:
        spec = record.spec
        timing = ClientToolTiming(spec.id, asyncio.get_running_loop().time())
        self.client_timings.append(timing)
        try:
            values = await self._resolve_args(record, args)
            fn = record.client_tool
            assert fn is not None
            if inspect.iscoroutinefunction(fn):
                result = await fn(**values)
            else:  # never block the event loop
                result = await asyncio.to_thread(fn, **values)
        except (CallFailedError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise CallFailedError(
                self.program_id,
                spec.id,
                spec.output,
                f"tool {spec.tool!r} raised {type(exc).__name__}: {exc}",
                record.site,
            ) from exc
        finally:
            timing.finished_at = asyncio.get_running_loop().time()
        return result if isinstance(result, str) else json.dumps(result, default=str)

    async def _resolve_args(self, record: CallRecord, args: dict[str, Any]) -> dict[str, Any]:
        names = record.spec.input_variables()
        try:
            values = dict(zip(names, await self.values_of(self._handles(names)), strict=True))
        except CallFailedError as exc:
            raise CallFailedError(
                self.program_id,
                record.spec.id,
                record.spec.output,
                f"its input {exc.variable!r} failed: {exc}",
                record.site,
            ) from exc
        resolved: dict[str, Any] = {}
        for key, arg in args.items():
            if isinstance(arg, SemanticVariable):
                resolved[key] = values[arg.name]
            elif isinstance(arg, JoinedVariables):
                resolved[key] = [values[v.name] for v in arg.variables]
            elif isinstance(arg, str):
                resolved[key] = render(arg, values)
            else:
                resolved[key] = arg
        return resolved

    def _handles(self, names: list[str]) -> list[SemanticVariable]:
        return [SemanticVariable(n, self.graph.producer.get(n), self) for n in names]

    # -- the end -----------------------------------------------------------------------
    async def drain(self) -> None:
        """Send what is left and wait for every call to finish (structured: a program ends
        when all its calls have). A failed call nobody awaited still fails the program."""
        await self.flush()
        consumed = {
            name for record in self.graph.calls.values() for name in record.spec.input_variables()
        }
        # A failure the program already received is its to handle, not raised again.
        leaves = [name for name in self.graph.producer
                  if name not in consumed and name not in self._raised]
        results = await asyncio.gather(*(self._value(n) for n in leaves), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def abort(self) -> None:
        """Cancel local work and the program's calls on the server."""
        for task in [*self._client_tasks.values(), *self._background]:
            task.cancel()
        if self.submitted:
            await self.runtime.cancel_program(self.program_id)

    async def end(self) -> None:
        if self.submitted:
            await self.runtime.end_program(self.program_id)
