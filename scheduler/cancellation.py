"""Stopping calls from outside their executors: a cancelled program (everything queued,
running or pending in it), queued calls when every replica stayed down, and a running
call preempted to make room (its engine request is aborted; its executor sees the abort
finish and queues it again)."""

from __future__ import annotations

from collections.abc import Iterable

from engine_backend.errors import EngineError

from .call_endings import CallEndings
from .call_queue import CallQueue
from .call_runner import engine_rid
from .errors import ProgramCancelledError
from .loop_context import LoopContext
from .program import CallNode, CallStatus, Program
from .replica import Replica


class Cancellation:
    def __init__(
        self,
        loop: LoopContext,
        replicas: list[Replica],
        queue: CallQueue,
        endings: CallEndings,
    ) -> None:
        self.loop = loop
        self.replicas = replicas
        self.queue = queue
        self.endings = endings

    def cancel_in_flight(self, program: Program) -> None:
        """Cancel every call of the program not yet done, and fail its open variables."""
        now = self.loop.time()
        error = ProgramCancelledError(program.id)
        for call in list(program.calls.values()):
            if call.done:
                continue
            if call.status == CallStatus.RUNNING and call.kind == "llm":
                self.abort_running(call)  # its executor sees the abort finish and ends it
                continue
            if call.status == CallStatus.QUEUED:
                self.queue.remove(call)
            waiter = call.waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
                continue  # its executor raises and ends the call
            if call.status == CallStatus.PENDING:
                self.endings.end(call, CallStatus.CANCELLED, error, now)
            if call.kind == "tool" and call.task is not None:
                call.task.cancel()
        for slot in program.variables.values():
            if not slot.done and slot.failed is None:
                slot.fail(error)

    def fail_queued(self, programs: Iterable[Program], error: BaseException) -> int:
        """Fail every queued LLM call with `error` (every replica stayed down)."""
        failed = 0
        for program in list(programs):
            for call in list(program.queued):
                waiter = call.waiter
                if waiter is not None and not waiter.done():
                    waiter.set_exception(error)  # its executor raises and ends the call
                    failed += 1
        return failed

    def abort_running(self, call: CallNode) -> None:
        """Abort the engine request of a running call (its executor sees the abort)."""
        request = call.request
        if request is None or call.replica < 0:
            return
        self.loop.spawn(_abort(self.replicas[call.replica], engine_rid(call, request)))


async def _abort(replica: Replica, rid: str) -> None:
    try:
        await replica.engine.abort(rid)
    except EngineError:
        pass  # already finished
