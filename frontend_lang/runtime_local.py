"""The in-process runtime: progserve's scheduler and engines in this Python process.

For notebooks, tests and the examples' default. It builds the same object graph as
`progserve serve` (`progserve.runtime.Runtime`: settings -> engines -> scheduler), plus a
tool executor with the builtin tools, and talks to the scheduler directly (no HTTP).

    async with LocalRuntime(load_settings(engine="sim")) as runtime:
        result = await my_program.run(runtime, "question")
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from progserve.config import Settings, load_settings
from progserve.runtime import ServerRuntime
from scheduler import errors as sched
from scheduler.scheduler import Scheduler
from scheduler.spec import CallSpec, ProgramSpec, ProgramState
from scheduler.tools.builtin import register_builtin_tools
from scheduler.tools.executor import ToolExecutor
from scheduler.tools.registry import ToolRegistry

from .errors import (
    CallFailedError,
    DSLError,
    ProgramCancelledError,
    ProgramDefinitionError,
    ProgramNotFoundError,
    RuntimeUnavailableError,
)


def builtin_tool_registry(
    docs_root: str | Path | None = None, settings: Settings | None = None
) -> ToolRegistry:
    """The server's builtin tools, plus `search_docs` over `docs_root` when given."""
    config = getattr(settings, "tools", None)  # the tools section, once settings have one
    return register_builtin_tools(ToolRegistry(config), docs_root=docs_root)


class LocalRuntime:
    """See the module docstring. `tools`: a registry of server-side tools (default: the
    server's builtin tools, with `search_docs` over `docs_root` when given); `tenant`: the
    tenant its programs belong to; `engines`: prebuilt engines instead of the settings'."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        tools: ToolRegistry | None = None,
        docs_root: str | Path | None = None,
        tenant: str = "default",
        engines: list[Any] | None = None,
    ) -> None:
        self.settings = settings if settings is not None else load_settings()
        self.tenant = tenant
        if tools is None and docs_root is not None:
            tools = builtin_tool_registry(docs_root, self.settings)
        executor = ToolExecutor(tools) if tools is not None else None
        self._server = ServerRuntime(self.settings, engines=engines, tools=executor)
        self._own_executor = executor  # the server runtime closes only tools it built

    @property
    def scheduler(self) -> Scheduler:
        return self._server.scheduler

    async def start(self) -> LocalRuntime:
        await self._server.start()
        return self

    async def close(self) -> None:
        await self._server.close()
        if self._own_executor is not None:
            await self._own_executor.aclose()

    async def __aenter__(self) -> LocalRuntime:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the Runtime protocol ----------------------------------------------------------
    async def submit_program(self, spec: ProgramSpec) -> str:
        with translated_errors(spec.program_id):
            return await self.scheduler.submit_program(spec, tenant=self.tenant)

    async def add_calls(self, program_id: str, calls: list[CallSpec]) -> None:
        with translated_errors(program_id):
            await self.scheduler.add_calls(program_id, calls, tenant=self.tenant)

    async def wait_variable(self, program_id: str, name: str) -> str:
        with translated_errors(program_id):
            return await self.scheduler.wait_variable(program_id, name, tenant=self.tenant)

    async def stream_variable(self, program_id: str, name: str) -> AsyncIterator[str]:
        with translated_errors(program_id):
            async for delta in self.scheduler.stream_variable(program_id, name, tenant=self.tenant):
                yield delta

    async def program_state(self, program_id: str) -> ProgramState:
        with translated_errors(program_id):
            return self.scheduler.program_state(program_id, tenant=self.tenant)

    async def cancel_program(self, program_id: str) -> None:
        with translated_errors(program_id):
            await self.scheduler.cancel_program(program_id, tenant=self.tenant)

    async def end_program(self, program_id: str) -> None:
        with translated_errors(program_id):
            await self.scheduler.end_program(program_id, tenant=self.tenant)


_SIMPLE: dict[type[Exception], Callable[[Exception], DSLError]] = {
    sched.ProgramValidationError: lambda e: ProgramDefinitionError(str(e)),
    sched.ProgramNotFoundError: lambda e: ProgramNotFoundError(str(e)),
    sched.SchedulerOverloadedError: lambda e: RuntimeUnavailableError(str(e)),
}


@contextmanager
def translated_errors(program_id: str | None) -> Iterator[None]:
    """Scheduler exceptions -> the DSL's typed errors (same meaning, DSL vocabulary)."""
    try:
        yield
    except sched.CallFailedError as exc:
        raise CallFailedError(exc.program_id, exc.call_id, exc.variable, str(exc.cause)) from exc
    except sched.ProgramCancelledError as exc:
        raise ProgramCancelledError(exc.program_id or program_id) from exc
    except sched.SchedulerError as exc:
        for kind, make in _SIMPLE.items():
            if isinstance(exc, kind):
                raise make(exc) from exc
        raise RuntimeUnavailableError(str(exc)) from exc
