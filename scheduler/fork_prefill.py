"""Fork prefill: parallel calls of one program on one prompt share its prefill.

A program that forks (tree search's n children, self-consistency's k samples, n
parallel tool plans) sends several calls with the same prompt at once. An engine that
admits them in one step computes the prompt's uncached part once *per call*: each
request matched the cache before any of them had filled it (SGLang under FCFS, the sim
engine). SGLang's own frontend avoids this for `fork` by committing the shared prefix
first, as a request with `max_new_tokens = 0`, and only then launching the branches.
This does the same in the scheduler, for calls it placed together:

when a call is about to be sent and other calls of its program, with the identical
prompt, were placed on the same replica in the same dispatch pass and not sent yet, it
sends a prefill-only request of that prompt first; it and its siblings send their own
requests once that one returns, and the engine serves their prompts from the cache
(all but the last token). The cost is one prefill-only request and, for the siblings,
the wait for it (one engine step when the engine has room); a failed prefill-only
request only releases them.

Only calls placed at the same time count as siblings: a call sent earlier has its
prefill under way already, and a call placed later finds the prompt cached. A fork
whose first call found the queue empty (placed and sent before its siblings were
queued) is not deduplicated in real time. Resumed attempts
(after a preemption or a failover) and chat-form requests (an upstream renders their
prompt itself) are left alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .policies.registry import PROGRAM_AWARE_POLICIES

if TYPE_CHECKING:
    from engine_backend.types import GenerateRequest

    from .config import SchedulerConfig
    from .loop_context import LoopContext
    from .program import CallNode, Program
    from .replica import Replica

FORK_RID_SUFFIX = "~fork"


def fork_prefill_enabled(config: SchedulerConfig) -> bool:
    """`fork_prefill`, or by default on for the program-aware policies: they know which
    calls are one program's (fcfs stays what an engine alone does)."""
    if config.fork_prefill is not None:
        return config.fork_prefill
    return config.policy in PROGRAM_AWARE_POLICIES


def prompt_identity(request: GenerateRequest) -> Any:
    """What two requests with the same prompt share (None: not deduplicated). A token
    list that carries its encoded key compares by the key (one bytes compare)."""
    if request.chat is not None:
        return None
    ids = request.input_ids
    if ids is None:
        return request.text
    key = getattr(ids, "key", None)
    return key.data if key is not None else tuple(ids)


class ForkPrefill:
    def __init__(self, loop: LoopContext) -> None:
        self.loop = loop
        # (program, replica index, prompt) -> the prefill-only request's completion
        self._inflight: dict[tuple[Program, int, Any], asyncio.Future[None]] = {}
        self.prefills = 0  # prefill-only requests sent
        self.deduplicated = 0  # calls that waited for one instead of prefilling alone

    def before_send(self, call: CallNode, replica: Replica,
                    engine_request: Callable[[CallNode, Replica], GenerateRequest],
                    ) -> asyncio.Future[None] | None:
        """The future to await before sending `call` to `replica` (None: send now);
        `engine_request` builds what the engine gets (for the prefill-only request)."""
        if call.preemptions or call.request is None:
            return None
        prompt = prompt_identity(call.request)
        if prompt is None:
            return None
        key = (call.program, replica.index, prompt)
        pending = self._inflight.get(key)
        if pending is not None:
            self.deduplicated += 1
            return pending
        if not self._has_unsent_sibling(call, replica, prompt):
            return None
        done: asyncio.Future[None] = self.loop.loop.create_future()
        self._inflight[key] = done
        self.prefills += 1
        self.deduplicated += 1
        self.loop.spawn(self._prefill(key, replica, engine_request(call, replica), done))
        return done

    async def wait_turn(self, call: CallNode, replica: Replica,
                        engine_request: Callable[[CallNode, Replica], GenerateRequest]) -> None:
        """Wait, if `call` is one of a fork's siblings, until their shared prefill is done
        (shielded: a sibling cancelled while it waits does not cancel the others')."""
        shared = self.before_send(call, replica, engine_request)
        if shared is not None:
            await asyncio.shield(shared)

    def _has_unsent_sibling(self, call: CallNode, replica: Replica, prompt: Any) -> bool:
        """Another call of the program placed on `replica` at the same time (the
        dispatcher stamps a pass's placements with one time) with the same prompt. One
        placed in the same pass resumes after this one, so it has not been sent. In
        virtual time a call placed and sent at once by an earlier pass at the same
        instant matches too: then the prefill-only request repeats its prompt's work,
        and the calls after it still share it."""
        for other in call.program.running:
            if (other is not call and other.replica == replica.index
                    and other.dispatched_at == call.dispatched_at and not other.preemptions
                    and other.request is not None
                    and prompt_identity(other.request) == prompt):
                return True
        return False

    async def _prefill(self, key: tuple[Program, int, Any], replica: Replica,
                       request: GenerateRequest, done: asyncio.Future[None]) -> None:
        sampling = request.sampling.model_copy(update={
            "max_new_tokens": 0, "min_new_tokens": 0, "regex": None, "json_schema": None})
        prefill = request.model_copy(update={
            "rid": request.rid[: 256 - len(FORK_RID_SUFFIX)] + FORK_RID_SUFFIX,
            "sampling": sampling, "return_logprob": False, "top_logprobs_num": 0})
        try:
            async for _ in replica.engine.generate(prefill):
                pass
        except Exception:  # noqa: BLE001 - the siblings then prefill on their own
            pass
        finally:
            del self._inflight[key]
            if not done.done():
                done.set_result(None)
