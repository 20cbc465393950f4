"""The LLM-call state machine: from the queue to a replica, one attempt at a time, to
the call's end.

An attempt (`CallRunner._attempt`) streams the call from one replica and ends one of
three ways (`AttemptOutcome`): finished (the engine's final chunk), preempted (aborted to
make room for a more urgent call, on engines without priorities) or failed over (its
replica failed, and another is up). The last two queue the call again: it resumes with
its prompt plus its output so far (`engine_request`), which the prefix cache mostly
serves, and its consumer's stream just continues. Anything else (a bad request, every
replica down, a cancelled program) ends the call as failed or cancelled.

Bookkeeping, answer first. The replica slot is freed the moment the engine stream ends.
Then the final chunk goes to the consumer, and the call is booked (its service into the
program's history, then its end: router, retention, admission, dependants) at once if
the consumer asks for more, or in the next turn of the event loop if it lets go of the
stream (closes it, or drops it): so a proxy writes its answer before the bookkeeping
runs, and an answered call holds no replica slot whatever its consumer does. Anything
that reads or changes a program books its answered calls first (`book_answered`).
Booking then never suspends (the in-process state store). A store outside the process
(Redis) suspends: there the call is booked before its final chunk goes out, so that no
client can see an answered call still running.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from engine_backend.errors import EngineError, EngineStreamEndedError, EngineUnavailableError
from engine_backend.types import Chunk, FinishType, GenerateRequest

from .call_endings import CallEndings
from .call_queue import CallQueue
from .choices import pick_choice
from .config import SchedulerConfig
from .errors import CallFailedError, ProgramCancelledError
from .events import EventBus, EventKind
from .fork_prefill import ForkPrefill, fork_prefill_enabled
from .loop_context import LoopContext, run_now
from .policies import Policy
from .program import CallNode, CallStatus, VariableSlot
from .replica import Replica
from .replica_health import ReplicaHealth
from .retention import RetentionManager
from .router import Router
from .store import CallRecord, StateStore

log = logging.getLogger(__name__)



# The request fields the scheduler sets on a call's first attempt (`engine_request`).
_SET_IN_PLACE = ("priority", "program_id", "cache_salt")


class AttemptOutcome(Enum):
    FINISHED = "finished"  # the engine's final chunk came (`Attempt.final`)
    PREEMPTED = "preempted"  # aborted to make room: queued again, resumes later
    FAILED_OVER = "failed over"  # its replica failed: queued again for another one


@dataclass(slots=True)
class Attempt:
    """One try of a call on one replica."""

    replica: Replica
    started: float
    stream: AsyncIterator[Chunk] | None = None  # the engine's, once opened
    tokens: int = 0  # output tokens streamed (a resume after a failure skips them)
    outcome: AttemptOutcome | None = None
    final: Chunk | None = None  # when finished: the engine's final chunk
    status: CallStatus = CallStatus.FINISHED  # when finished: or CANCELLED (engine abort)


@dataclass(slots=True)
class OutputSoFar:
    """What a call keeps of its output across attempts, and where its text goes."""

    ids: list[int] | None  # token ids, kept when the prompt is ids (a resume re-sends them)
    parts: list[str] | None  # text, kept when a resume may re-send it or a choice needs it
    stream_to: VariableSlot | None  # a graph call's variable, filled as the text streams
    choices: list[str] | None  # a select call: the variable gets the choice picked at the end
    choice_slot: VariableSlot | None


def engine_rid(call: CallNode, request: GenerateRequest) -> str:
    """The rid of the call's current attempt: each resume is a new engine request."""
    return request.rid if not call.preemptions else f"{request.rid}~{call.preemptions}"


class CallRunner:
    def __init__(
        self,
        config: SchedulerConfig,
        loop: LoopContext,
        bus: EventBus,
        replicas: list[Replica],
        policy: Policy,
        queue: CallQueue,
        router: Router,
        retention: RetentionManager,
        health: ReplicaHealth,
        store: StateStore,
        endings: CallEndings,
    ) -> None:
        self.config = config
        self.loop = loop
        self.bus = bus
        self.replicas = replicas
        self.policy = policy
        self.queue = queue
        self.dispatcher = queue.dispatcher
        self.admission = queue.admission
        self.router = router
        self.retention = retention
        self.health = health
        self.store = store
        self.endings = endings
        # The output so far is what a resume re-sends: after a preemption, or on another
        # replica after a failure (`_failed_over`).
        self._keep_text = config.preempt_without_priority or (
            config.engine_retries > 0 and len(replicas) > 1)
        self._token_cost = (config.prefill_token_cost_s, config.decode_token_cost_s)
        self._engine_time_service = config.service_metric == "engine_time"
        self._book_after_answer = store.in_process
        # Answered calls not yet booked -> (the replica that answered, their status).
        self.answered: dict[CallNode, tuple[Replica, CallStatus]] = {}
        self._booking_soon = False  # a loop callback will book them
        self.forks = ForkPrefill(loop) if fork_prefill_enabled(config) else None

    # ------------------------------------------------------------------ the call
    async def stream(self, make_call: Callable[[], CallNode]) -> AsyncGenerator[Chunk, None]:
        """The call's chunks, attempt after attempt (the final one's counters cover them
        all). `make_call` returns the queued call: a proxy call is created at the first
        iteration, so a stream nobody iterates never queues one. Closing the stream before
        its final chunk aborts the call. An attempt is the inner `try`, ended as `_attempt_ended`
        or `_failed_over` say; inline, as is each chunk's accounting (5% of the CPU else)."""
        call = make_call()
        out = self._output_of(call)
        status: CallStatus = CallStatus.CANCELLED
        error: BaseException | None = None
        answered = False
        try:
            while True:
                if call.status == CallStatus.QUEUED:
                    assert call.waiter is not None
                    await call.waiter
                attempt = Attempt(self.replicas[call.replica], self.loop.time())
                try:
                    if self.forks is not None:  # a fork's siblings share one prefill
                        await self.forks.wait_turn(call, attempt.replica, self.engine_request)
                    async for chunk in self._open(call, attempt):
                        attempt.tokens = max(attempt.tokens + len(chunk.token_ids),
                                             chunk.completion_tokens)
                        if not call.prompt_tokens and chunk.prompt_tokens:
                            call.prompt_tokens = chunk.prompt_tokens
                        if call.first_token_at < 0:
                            self._first_token(call, chunk)
                        if out.ids is not None and chunk.token_ids:
                            out.ids.extend(chunk.token_ids)
                        if chunk.text:
                            if out.parts is not None:
                                out.parts.append(chunk.text)
                            if out.stream_to is not None:
                                out.stream_to.append(chunk.text)
                        if chunk.finish_reason is None:
                            yield chunk
                            continue
                        attempt.outcome = self._attempt_ended(call, attempt, chunk, out)
                        break
                    else:
                        raise EngineStreamEndedError(f"engine stream of {call.id!r} ended early")
                except EngineUnavailableError as exc:
                    attempt.outcome = self._failed_over(call, attempt, exc)
                finally:  # over, or the consumer left: the engine request and the slot go
                    if attempt.stream is not None:
                        await attempt.stream.aclose()  # type: ignore[attr-defined]
                    self.dispatcher.release(call)
                if attempt.outcome is AttemptOutcome.FINISHED:
                    break
                self._queue_again(call, attempt.outcome)
            status = attempt.status
            if not self._book_after_answer:
                await self._book(call, attempt.replica, status)
                answered = True
                yield attempt.final  # type: ignore[misc]
                return
            self.answered[call] = (attempt.replica, status)
            answered = True
            try:
                yield attempt.final  # type: ignore[misc]
            except BaseException:  # let go after its answer: booked in the next loop turn
                if not self._booking_soon:
                    self._booking_soon = True
                    self.loop.loop.call_soon(self._book_soon)
                raise
            if self.answered.pop(call, None) is not None:  # the consumer asked for more
                if status == CallStatus.FINISHED:
                    await self._record_service(call)
                self._end(call, attempt.replica, status, None)
        except EngineError as exc:
            status, error = CallStatus.FAILED, exc
            raise CallFailedError(call.program.id, call.id, call.output, exc) from exc
        except ProgramCancelledError as exc:
            status, error = CallStatus.CANCELLED, exc
            raise
        finally:
            if not answered and not call.done:
                self._end(call, None, status, error)

    def _first_token(self, call: CallNode, chunk: Chunk) -> None:
        """The call's first token came. A final chunk's end event stands for it
        (`SchedulerEvent.with_first_token`): no CALL_FIRST_TOKEN then."""
        call.first_token_at = self.loop.time()
        if chunk.finish_reason is None and EventKind.CALL_FIRST_TOKEN in self.bus.wanted:
            call.first_token_sent = True
            self.bus.call_event(EventKind.CALL_FIRST_TOKEN, call)

    def _output_of(self, call: CallNode) -> OutputSoFar:
        request = call.request
        assert request is not None
        slot = call.program.variables.get(call.output) if call.output is not None else None
        choices = call.spec.choices if call.spec is not None else None
        if call.output_ids is None:
            call.output_ids = []
        if (self._keep_text or choices) and call.output_parts is None:
            call.output_parts = []
        return OutputSoFar(
            ids=call.output_ids if request.input_ids is not None else None,
            parts=call.output_parts,
            stream_to=slot if not choices else None,
            choices=choices,
            choice_slot=slot,
        )

    # ------------------------------------------------------------------ one attempt
    def _open(self, call: CallNode, attempt: Attempt) -> AsyncIterator[Chunk]:
        """The attempt's engine stream (errors the engine finds in the request are raised
        here, before anything streams)."""
        replica = attempt.replica
        attempt.stream = replica.engine.generate(self.engine_request(call, replica))
        return attempt.stream

    def engine_request(self, call: CallNode, replica: Replica) -> GenerateRequest:
        """What the engine gets for the call's current attempt: the client's request with
        the scheduler's priority and cache owner; on a resume, the prompt plus the output
        so far and what is left of the token budget."""
        request = call.request
        assert request is not None
        priority = request.priority
        if self.config.pass_priority and replica.capabilities.priority:
            priority = self.policy.engine_rank(call)
        # The cache owner for retention hints; an untagged call's one-call program never
        # gets any, so engines need not track it.
        owner = None if call.program.single_call else call.program.engine_key
        if not call.preemptions:
            # Set in place: a copy per call costs more than the rest of dispatch. What
            # pydantic's assignment does for fields without validate_assignment (store,
            # mark set), without its two Python calls per field.
            fields = request.__dict__
            fields["priority"] = priority
            fields["program_id"] = owner
            fields["cache_salt"] = call.program.cache_salt
            request.__pydantic_fields_set__.update(_SET_IN_PLACE)
            return request
        # Resume: the prompt plus the output so far, mostly served from the prefix cache.
        sampling = request.sampling
        done = call.completion_tokens
        update: dict[str, Any] = {
            "program_id": owner,
            "priority": priority,
            "cache_salt": call.program.cache_salt,
            "rid": engine_rid(call, request),
            "sampling": sampling.model_copy(update={
                "max_new_tokens": max(sampling.max_new_tokens - done, 1),
                "min_new_tokens": max(sampling.min_new_tokens - done, 0),
            }),
        }
        if request.input_ids is not None:
            # Any int container a client sent (a list, an int64 array): a list again.
            update["input_ids"] = [*request.input_ids, *(call.output_ids or ())]
        else:
            update["text"] = (request.text or "") + "".join(call.output_parts or ())
        if request.chat is not None:  # a chat upstream continues the answer so far
            update["chat"] = request.chat.model_copy(update={
                "assistant_prefix": "".join(call.output_parts or ())})
        return request.model_copy(update=update)

    def _attempt_ended(
        self, call: CallNode, attempt: Attempt, chunk: Chunk, out: OutputSoFar
    ) -> AttemptOutcome:
        """The engine's final chunk of this attempt: the call finished (or the engine
        aborted it: `attempt.status` says which), or it was preempted."""
        call.engine_time += self.loop.time() - attempt.started
        reason = chunk.finish_reason
        assert reason is not None
        if reason.type is FinishType.ABORT and call.preempt_requested:
            if not call.prompt_tokens:
                call.prompt_tokens = chunk.prompt_tokens
            call.completion_tokens += chunk.completion_tokens
            call.cached_tokens += chunk.cached_tokens
            # Its service so far ranks it when it queues again (demotion).
            call.service += self._token_cost[1] * chunk.completion_tokens
            return AttemptOutcome.PREEMPTED
        account_final(call, chunk)
        if out.choice_slot is not None and out.choices and out.parts is not None:
            out.choice_slot.parts = [pick_choice("".join(out.parts), out.choices)]
        attempt.final = chunk
        attempt.status = (CallStatus.CANCELLED if reason.type is FinishType.ABORT
                          else CallStatus.FINISHED)
        return AttemptOutcome.FINISHED

    def _failed_over(
        self, call: CallNode, attempt: Attempt, exc: EngineUnavailableError
    ) -> AttemptOutcome:
        """The attempt's replica failed: take it out of rotation and, while retries remain
        and another replica is up, resume the call elsewhere with its prompt plus the
        output so far (the client's stream just continues). Else raise `exc`."""
        replica = attempt.replica
        self.health.mark_down(replica, exc)
        if not exc.resumable or call.retries >= self.config.engine_retries \
                or not self.health.any_up():
            raise exc
        call.retries += 1
        # The engine may count what it delivered when its chunks did not.
        call.completion_tokens += max(attempt.tokens, exc.delivered_tokens)
        if not call.prompt_tokens:
            call.prompt_tokens = exc.prompt_tokens
        self.health.counters.failovers += 1
        log.warning("call %s of program %s: replica %d failed (%s); resuming on another "
                    "replica (retry %d)", call.id, call.program.id, replica.index,
                    type(exc).__name__, call.retries)
        return AttemptOutcome.FAILED_OVER

    def _queue_again(self, call: CallNode, outcome: AttemptOutcome | None) -> None:
        if outcome is AttemptOutcome.PREEMPTED:
            call.preempt_requested = False
            if EventKind.CALL_PREEMPTED in self.bus.wanted:
                self.bus.call_event(EventKind.CALL_PREEMPTED, call)
        call.preemptions += 1
        self.queue.enqueue(call)

    # ------------------------------------------------------------------ bookkeeping
    def _book_soon(self) -> None:
        self._booking_soon = False
        self.book_answered()

    def book_answered(self) -> None:
        """Book every answered call now (callers check `answered` first: it is nearly
        always empty). Runs in the loop turn after a consumer let go of an answered call
        (one turn books all of that turn's), and whenever someone is about to read or
        change programs, who must find them as their clients do."""
        answered = self.answered
        while answered:
            call = next(iter(answered))
            self._book_now(call, *answered.pop(call))

    def _book_now(self, call: CallNode, replica: Replica, status: CallStatus) -> None:
        """Book a call with the in-process store, whose updates never suspend."""
        if status == CallStatus.FINISHED:
            run_now(self._record_service(call))
        self._end(call, replica, status, None)

    async def _book(self, call: CallNode, replica: Replica, status: CallStatus) -> None:
        """Book a call with a store outside the process (its updates suspend)."""
        if status == CallStatus.FINISHED:
            await self._record_service(call)
        self._end(call, replica, status, None)

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

    def _end(
        self,
        call: CallNode,
        replica: Replica | None,
        status: CallStatus,
        error: BaseException | None,
    ) -> None:
        """End an LLM call: out of every queue and off its replica, what it cached where,
        then the ending every call has (`CallEndings.end`)."""
        now = self.loop.time()
        if call.status == CallStatus.QUEUED:
            self.queue.remove(call)
        waiter = call.waiter
        if waiter is not None and not waiter.done():
            waiter.cancel()
        if replica is None:  # else its attempt ended, and freed the slot
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
        self.endings.end(call, status, error, now)


def account_final(call: CallNode, chunk: Chunk) -> None:
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
