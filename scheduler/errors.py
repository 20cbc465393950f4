"""Typed scheduler errors. Each carries the HTTP status the server maps it to."""

from __future__ import annotations


class SchedulerError(Exception):
    """Base class of every error the scheduler raises on purpose."""

    status_code = 500


class ProgramValidationError(SchedulerError, ValueError):
    """A submitted program or call is malformed: a cycle, an unknown variable or parent,
    a duplicate call id, a graph over the size limits (HTTP 400)."""

    status_code = 400


class ProgramExistsError(ProgramValidationError):
    """A program with this id is already open for this tenant: the request conflicts with
    the server's state, not with the schema (HTTP 409)."""

    status_code = 409


class CallExistsError(ProgramValidationError):
    """The program already has a call with this id (an earlier request added it): a
    conflict with the program's state, not a malformed request (HTTP 409)."""

    status_code = 409


class ProgramNotFoundError(SchedulerError, KeyError):
    """No such program *for this tenant* (HTTP 404). Also raised when a tenant names
    another tenant's program, so that existence is never leaked."""

    status_code = 404

    def __init__(self, program_id: str) -> None:
        super().__init__(program_id)
        self.program_id = program_id

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return f"program {self.program_id!r} not found"


class ProgramCancelledError(SchedulerError):
    """The program was cancelled while the caller waited on it (HTTP 409)."""

    status_code = 409

    def __init__(self, program_id: str) -> None:
        super().__init__(f"program {program_id!r} was cancelled")
        self.program_id = program_id


class CallFailedError(SchedulerError):
    """An LLM or tool call failed; dependants of a failed call fail with it (HTTP 502 when
    the cause is an engine or tool failure, else the cause's own status)."""

    status_code = 502

    def __init__(
        self, program_id: str, call_id: str, variable: str | None, cause: BaseException | str
    ) -> None:
        self.program_id = program_id
        self.call_id = call_id
        self.variable = variable
        self.cause = cause
        target = f"variable {variable!r} (call {call_id!r})" if variable else f"call {call_id!r}"
        super().__init__(f"program {program_id!r}: {target} failed: {cause}")
        status = getattr(cause, "status_code", None)
        if isinstance(status, int) and 400 <= status < 500:
            self.status_code = status


class SchedulerOverloadedError(SchedulerError):
    """Too many programs or calls are open; retry after `retry_after` seconds (HTTP 429)."""

    status_code = 429

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
