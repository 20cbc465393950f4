"""Fork prefill (scheduler/fork_prefill.py): parallel calls of one program on one prompt,
placed together, share one prefill instead of each computing the prompt."""

from __future__ import annotations

import asyncio

from engine_backend.sim.config import SimConfig
from engine_backend.sim.engine import SimEngine
from engine_backend.types import GenerateRequest, SamplingParams
from engine_backend.virtual_time import run_virtual
from scheduler.config import SchedulerConfig
from scheduler.fork_prefill import fork_prefill_enabled
from scheduler.scheduler import Scheduler

PROMPT = list(range(1000, 1150))  # 150 tokens no other request has sent
FORKS = 5


def request(rid: str, ids: list[int], n: int) -> GenerateRequest:
    return GenerateRequest(rid=rid, input_ids=ids, sampling=SamplingParams(max_new_tokens=n))


async def drain(stream) -> list:
    return [chunk async for chunk in stream]


async def started_with_blocker(engine: SimEngine, **config) -> tuple[Scheduler, asyncio.Future]:
    """A scheduler whose replica's token budget a blocker fills for a while, so that the
    calls issued meanwhile queue and are placed together when it ends."""
    s = Scheduler([engine], SchedulerConfig(max_inflight_tokens=1000,
                                            decode_reserve_tokens=0, **config))
    await s.start()
    blocker = await s.open_program("blocker")
    blocking = asyncio.ensure_future(
        drain(s.llm_call(blocker, request("b", list(range(5000, 5900)), 50))))
    await asyncio.sleep(0.01)
    return s, blocking


def run_fork(**config) -> tuple[list, SimEngine, Scheduler]:
    """A blocker fills the replica's token budget; meanwhile a program issues FORKS calls
    on one fresh prompt. They queue, and the dispatch pass after the blocker ends places
    them together."""
    engine = SimEngine(SimConfig(stream_interval=0))

    async def main():
        s, blocking = await started_with_blocker(engine, **config)
        try:
            tree = await s.open_program("tree")
            outs = await asyncio.gather(*(
                drain(s.llm_call(tree, request(f"g{j}", PROMPT, 10), thread_id=f"t{j}"))
                for j in range(FORKS)))
            await blocking
            assert all(out[-1].completion_tokens == 10 for out in outs)
            return [c for c in s.program_state(tree).calls], s
        finally:
            await s.close()

    calls, s = run_virtual(main())
    return calls, engine, s


def test_forked_calls_share_one_prefill_of_their_prompt():
    calls, engine, s = run_fork(policy="plas")
    assert s.runner.forks is not None
    assert s.runner.forks.prefills == 1 and s.runner.forks.deduplicated == FORKS
    # Each call found all of its prompt but the last token cached: computed once.
    assert [c.cached_tokens for c in calls] == [len(PROMPT) - 1] * FORKS


def test_without_it_every_forked_call_computes_the_prompt():
    calls, engine, s = run_fork(policy="plas", fork_prefill=False)
    assert s.runner.forks is None
    assert [c.cached_tokens for c in calls] == [0] * FORKS


def test_on_by_default_for_the_program_aware_policies_only():
    assert fork_prefill_enabled(SchedulerConfig(policy="plas"))
    assert fork_prefill_enabled(SchedulerConfig(policy="atlas"))
    assert not fork_prefill_enabled(SchedulerConfig(policy="fcfs"))
    assert not fork_prefill_enabled(SchedulerConfig(policy="dlpm"))
    assert fork_prefill_enabled(SchedulerConfig(policy="fcfs", fork_prefill=True))
    calls, _, s = run_fork(policy="fcfs")
    assert s.runner.forks is None and [c.cached_tokens for c in calls] == [0] * FORKS


def test_forks_whose_client_leaves_during_the_shared_prefill_end_and_free_everything():
    """The forked calls wait (shielded) for their shared prefill-only request; their
    client leaves meanwhile: each call ends at once, nothing stays queued or in flight,
    the shared request's bookkeeping is cleared when it returns, and the scheduler serves
    the next call."""
    engine = SimEngine(SimConfig(stream_interval=0))

    async def main():
        s, blocking = await started_with_blocker(engine, policy="plas")
        try:
            tree = await s.open_program("tree")
            forks = [asyncio.ensure_future(drain(s.llm_call(
                tree, request(f"g{j}", PROMPT, 10), thread_id=f"t{j}"))) for j in range(FORKS)]
            while not s.runner.forks.prefills:  # the shared prefill is under way
                await asyncio.sleep(0.001)
            for task in forks:
                task.cancel()  # the client leaves
            await asyncio.gather(*forks, return_exceptions=True)
            states = [c.status for c in s.program_state(tree).calls]
            prefill_running = bool(s.runner.forks._inflight)
            await blocking
            await asyncio.sleep(1.0)
            idle = (s.queued(), dict(s.runner.forks._inflight),
                    sum(r.inflight_requests for r in s.replicas))
            after = await drain(s.llm_call(tree, request("next", [7, 8, 9], 3)))
            return states, prefill_running, idle, after
        finally:
            await s.close()

    states, prefill_running, idle, after = run_virtual(main())
    assert prefill_running  # the calls ended while their shared prefill was still running
    assert states == ["cancelled"] * FORKS
    assert idle == (0, {}, 0)
    assert after[-1].completion_tokens == 3
