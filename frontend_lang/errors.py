"""Typed errors of the DSL. Every error about a call names the call and its variable, so a
developer can find the offending `gen` / `tool` line from the message alone."""

from __future__ import annotations


class DSLError(Exception):
    """Base class of every error the DSL raises on purpose."""


class NoActiveProgramError(DSLError, RuntimeError):
    """A primitive (`gen`, `tool`, ...) was used outside a running `@program`."""


class ProgramDefinitionError(DSLError, ValueError):
    """The program's graph is malformed (bad name, bad options, misuse of a variable)."""


def _at(site: str | None) -> str:
    return f" (created at {site})" if site else ""


class UnknownVariableError(ProgramDefinitionError):
    """A template references a variable that no call of the program produces."""

    def __init__(
        self, variable: str, call_id: str, known: list[str] | None = None, site: str | None = None
    ) -> None:
        self.variable = variable
        self.call_id = call_id
        self.site = site
        hint = f"; known variables: {', '.join(sorted(known)[:12])}" if known else ""
        super().__init__(
            f"call {call_id!r}{_at(site)} references unknown variable {variable!r}{hint}. "
            f"If '{{{{{variable}}}}}' is meant as literal text (a document that contains "
            f"braces), pass that text as a variable with `let(text)` instead"
        )


class CycleError(ProgramDefinitionError):
    """The calls' data flow has a cycle: a call (indirectly) reads its own output."""

    def __init__(
        self, variable: str, call_id: str, cycle: list[str], site: str | None = None
    ) -> None:
        self.variable = variable
        self.call_id = call_id
        self.cycle = cycle
        self.site = site
        super().__init__(
            f"call {call_id!r}{_at(site)} reads variable {variable!r}, which depends on the "
            f"call's own output: cycle {' -> '.join(cycle)}"
        )


class CallFailedError(DSLError):
    """A call failed (an engine error, a tool that raised or timed out), or one of its
    inputs did: awaiting its variable, or any variable that depends on it, raises this."""

    def __init__(
        self,
        program_id: str | None,
        call_id: str,
        variable: str | None,
        cause: str,
        site: str | None = None,
    ) -> None:
        self.program_id = program_id
        self.call_id = call_id
        self.variable = variable
        self.cause = cause
        self.site = site
        target = f"variable {variable!r} of call {call_id!r}" if variable else f"call {call_id!r}"
        super().__init__(f"{target}{_at(site)} failed: {cause}")


class ProgramCancelledError(DSLError):
    """The program was cancelled; its calls in flight were cancelled with it."""

    def __init__(self, program_id: str | None, reason: str = "cancelled") -> None:
        self.program_id = program_id
        super().__init__(f"program {program_id!r} {reason}")


class ProgramNotFoundError(DSLError, LookupError):
    """The runtime does not know the program (it ended long ago, or another tenant's)."""


class RuntimeUnavailableError(DSLError, ConnectionError):
    """The runtime (remote server or embedded engine) cannot be reached or refused us."""
