"""How every call ends (LLM or tool, finished, failed or cancelled), and how a failure
propagates: the call's status and variable, the program's bookkeeping, the lifecycle
event, then its dependants. A finished call resolves one input of each dependant (which
starts once all are resolved); a failed or cancelled one ends its dependants with it."""

from __future__ import annotations

from collections.abc import Callable

from .errors import CallFailedError, ProgramCancelledError
from .events import EventBus, EventKind
from .program import CALL_STATUS_NAMES, CallNode, CallStatus
from .program_table import ProgramTable


class CallEndings:
    def __init__(
        self,
        bus: EventBus,
        programs: ProgramTable,
        start_ready: Callable[[CallNode], None],
    ) -> None:
        self.bus = bus
        self.programs = programs
        self._start_ready = start_ready  # a graph call whose inputs all resolved
        self.calls_finished = 0
        self.calls_failed = 0
        self.last_end_at = -1.0  # loop time of the latest call ending (stall watch)

    def end(
        self, call: CallNode, status: CallStatus, error: BaseException | None, now: float
    ) -> None:
        """End `call`, and its dependants if it did not finish. A worklist rather than
        recursion: a deep chain (thousands of calls) must not exhaust the stack."""
        first = call
        pending: list[tuple[CallNode, CallStatus, BaseException | None]] = [
            (call, status, error)]
        while pending:
            call, status, error = pending.pop()
            if call is not first and call.status != CallStatus.PENDING:
                continue  # a dependant of two failed calls ends once
            self._end_one(call, status, error, now)
            for child in call.children:
                if child.status != CallStatus.PENDING:
                    continue
                if status == CallStatus.FINISHED:
                    child.unresolved -= 1
                    if child.unresolved == 0:
                        self._start_ready(child)
                else:
                    pending.append((
                        child,
                        CallStatus.FAILED if status == CallStatus.FAILED else CallStatus.CANCELLED,
                        failure(call, error),
                    ))
            program = call.program
            if status == CallStatus.FAILED and program.error is None:
                program.error = call.error
            if program.open_calls == 0:
                if program.is_closed:
                    self.programs.closed_program_idle(program)
                else:
                    self.programs.went_idle(program, now)

    def _end_one(
        self, call: CallNode, status: CallStatus, error: BaseException | None, now: float
    ) -> None:
        """The call itself: its status, its program's counts, its event, its variable."""
        call.status = status
        call.finished_at = now
        self.last_end_at = now
        program = call.program
        program.running.discard(call)
        program.queued.discard(call)
        program.open_calls -= 1
        if call.kind == "llm":
            self.programs.tenant_calls.closed(program.tenant)
        program.history.thread_closed(call.thread_id)
        if status == CallStatus.FINISHED:
            self.calls_finished += 1
            kind = EventKind.CALL_FINISHED if call.kind == "llm" else EventKind.TOOL_FINISHED
        else:
            if status == CallStatus.FAILED:
                self.calls_failed += 1
            call.error = str(error) if error is not None else CALL_STATUS_NAMES[status]
            kind = EventKind.CALL_FAILED if call.kind == "llm" else EventKind.TOOL_FAILED
        wanted = self.bus.wanted
        if kind in wanted:
            # A one-call program closes (finished) right after its call's end (`end`):
            # the call's end event stands for the program's.
            program_end = (program.single_call and program.open_calls == 0
                           and not program.is_closed and call.kind == "llm"
                           and EventKind.PROGRAM_ENDED in wanted)
            if program_end:
                program.end_sent = True
            self.bus.call_event(kind, call, error=call.error, program_end=program_end)
        call.waiter = None
        if call.kind == "llm":  # its state shows no more of its spec (a tool's: its name)
            call.spec = None
        if call.output is not None:
            slot = program.variables[call.output]
            if status == CallStatus.FINISHED:
                slot.finish()
            else:
                slot.fail(failure(call, error))


def failure(call: CallNode, error: BaseException | None) -> BaseException:
    """The error a call's variable and dependants see when it did not finish."""
    if isinstance(error, CallFailedError | ProgramCancelledError):
        return error
    if call.status == CallStatus.CANCELLED:
        return ProgramCancelledError(call.program.id)
    return CallFailedError(call.program.id, call.id, call.output, error or "failed")
