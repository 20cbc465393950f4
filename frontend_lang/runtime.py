"""What a DSL runtime is: the few operations a running program needs from a scheduler.

Two implementations, same programs: `RemoteRuntime` (a progserve server's native program
API over HTTP) and `LocalRuntime` (a scheduler and engines in this process). Both raise
`frontend_lang.errors` types, never transport or scheduler exceptions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from scheduler.spec import CallSpec, ProgramSpec, ProgramState


@runtime_checkable
class Runtime(Protocol):
    async def submit_program(self, spec: ProgramSpec) -> str:
        """Submit a program graph; returns the program id."""
        ...

    async def add_calls(self, program_id: str, calls: list[CallSpec]) -> None:
        """Extend a running program's graph."""
        ...

    async def wait_variable(self, program_id: str, name: str) -> str:
        """The variable's value, once produced. Raises `CallFailedError` if its call (or
        an input of it) failed, `ProgramCancelledError` if the program was cancelled."""
        ...

    def stream_variable(self, program_id: str, name: str) -> AsyncIterator[str]:
        """The variable's value in deltas as it is generated."""
        ...

    async def program_state(self, program_id: str) -> ProgramState: ...

    async def cancel_program(self, program_id: str) -> None:
        """Cancel the program and every call it has in flight."""
        ...

    async def end_program(self, program_id: str) -> None:
        """No more calls will come: the scheduler may release the program's pinned KV."""
        ...

    async def close(self) -> None: ...
