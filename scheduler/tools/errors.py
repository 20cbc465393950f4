"""Typed tool errors. Every message names the tool and the call, so that a program's
error says which of its steps failed and why.

They derive from `SchedulerError`, so the server maps each to one HTTP status in one
place (`progserve.errors.classify`): a request for an unregistered tool or with bad
arguments is the client's fault (4xx); a tool that fails or hangs is not (5xx).
"""

from __future__ import annotations

from scheduler.errors import SchedulerError


def _where(tool: str, call_id: str | None, program_id: str | None) -> str:
    parts = [f"tool {tool!r}"]
    if call_id:
        parts.append(f"call {call_id!r}")
    if program_id:
        parts.append(f"program {program_id!r}")
    return ", ".join(parts)


class ToolError(SchedulerError):
    """Base class of every error the tool layer raises on purpose."""

    status_code = 500

    def __init__(
        self,
        tool: str,
        message: str,
        *,
        call_id: str | None = None,
        program_id: str | None = None,
    ) -> None:
        self.tool = tool
        self.call_id = call_id
        self.program_id = program_id
        self.detail = message
        super().__init__(f"{_where(tool, call_id, program_id)}: {message}")


class UnknownToolError(ToolError, KeyError):
    """The name is not a registered tool. A request can only call registered tools
    (HTTP 400): the server never evaluates code it was sent."""

    status_code = 400

    def __init__(
        self,
        tool: str,
        *,
        known: list[str] | None = None,
        call_id: str | None = None,
        program_id: str | None = None,
    ) -> None:
        hint = f"; registered tools: {', '.join(sorted(known))}" if known else ""
        super().__init__(tool, f"no such tool{hint}", call_id=call_id, program_id=program_id)

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class ToolArgumentError(ToolError, ValueError):
    """The arguments do not fit the tool's signature, or are not valid JSON (HTTP 400)."""

    status_code = 400


class ToolTimeoutError(ToolError):
    """The tool ran past its timeout and was cut (HTTP 504)."""

    status_code = 504

    def __init__(
        self,
        tool: str,
        timeout_s: float,
        *,
        call_id: str | None = None,
        program_id: str | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        super().__init__(
            tool,
            f"timed out after {timeout_s:g} s and was cut",
            call_id=call_id,
            program_id=program_id,
        )


class ToolFailedError(ToolError):
    """The tool raised; `cause` is its exception (HTTP 502: a dependency failed)."""

    status_code = 502

    def __init__(
        self,
        tool: str,
        cause: BaseException | str,
        *,
        attempts: int = 1,
        call_id: str | None = None,
        program_id: str | None = None,
    ) -> None:
        self.cause = cause
        self.attempts = attempts
        what = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else cause
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(tool, f"failed{tries}: {what}", call_id=call_id, program_id=program_id)


class ToolCancelledError(ToolError):
    """The tool was cancelled because its program was cancelled (HTTP 409)."""

    status_code = 409

    def __init__(
        self, tool: str, *, call_id: str | None = None, program_id: str | None = None
    ) -> None:
        super().__init__(tool, "cancelled with its program", call_id=call_id, program_id=program_id)


class PlanError(SchedulerError, ValueError):
    """An LLMCompiler plan is malformed (HTTP 400). `task` is the offending task index,
    `line` the offending plan line, when known."""

    status_code = 400

    def __init__(self, message: str, *, task: int | None = None, line: str | None = None):
        self.task = task
        self.line = line
        where = f"task {task}: " if task is not None else ""
        quoted = f" (line: {line.strip()!r})" if line else ""
        super().__init__(f"malformed plan: {where}{message}{quoted}")


class PlanSyntaxError(PlanError):
    """A plan line could not be parsed (bad numbering, bad arguments)."""


class PlanReferenceError(PlanError):
    """A task references a task that does not exist, itself, or a later task. Plans
    must be topologically ordered, which also rules out cycles."""


class PlanCycleError(PlanReferenceError):
    """The tasks' references form a cycle (reported with the cycle itself)."""


class PlanUnknownToolError(PlanError):
    """A task names a tool that is not registered."""


class JoinerOutputError(SchedulerError, ValueError):
    """The joiner's answer has no `Action: Finish(...)` or `Action: Replan(...)` line."""

    status_code = 502
