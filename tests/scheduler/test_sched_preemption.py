"""Abort-and-resume preemption for engines that ignore priorities."""

from __future__ import annotations

import asyncio

from sched_fake_engine import FakeEngine

from engine_backend.types import GenerateRequest, SamplingParams
from engine_backend.virtual_time import run_virtual
from scheduler.config import SchedulerConfig
from scheduler.scheduler import Scheduler


def test_long_call_is_preempted_for_a_fresh_one_and_resumes_with_its_output():
    async def main():
        engine = FakeEngine(slots=4, priority=False, token_s=0.01)
        config = SchedulerConfig(policy="mlfq", preempt_without_priority=True,
                                 max_inflight_requests=1, mlfq_quantum=0.1,
                                 mlfq_first_bound=0.05)
        s = Scheduler([engine], config)
        await s.start()
        done: dict[str, float] = {}

        async def run(pid: str, rid: str, n: int, delay: float) -> list:
            await asyncio.sleep(delay)
            await s.open_program(pid)
            req = GenerateRequest(rid=rid, text="prompt", sampling=SamplingParams(max_new_tokens=n))
            chunks = [c async for c in s.llm_call(pid, req)]
            done[rid] = asyncio.get_running_loop().time()
            return chunks

        long_chunks, short_chunks = await asyncio.gather(
            run("long", "L", 500, 0.0), run("short", "S", 5, 0.5)
        )
        assert done["S"] < done["L"]  # the fresh call did not wait 5 s behind the long one
        assert done["S"] < 1.0
        assert "L" in engine.aborted
        final = long_chunks[-1]
        assert final.completion_tokens == 500  # every attempt counted
        assert sum(len(c.token_ids) for c in long_chunks) == 500
        resumed = [r for r in engine.requests if r.rid.startswith("L~")]
        assert resumed, "the long call was resumed under a new rid"
        first = resumed[0]
        assert first.text.startswith("prompt") and first.text.endswith("x")
        assert first.sampling.max_new_tokens < 500
        state = s.program_state("long")
        assert state.calls[0].preemptions >= 1
        assert (await s.stats()).preemptions >= 1
        await s.close()

    run_virtual(main())


def test_no_preemption_when_the_engine_honours_priorities():
    async def main():
        engine = FakeEngine(slots=4, priority=True, token_s=0.01)
        config = SchedulerConfig(policy="mlfq", preempt_without_priority=True,
                                 max_inflight_requests=1, mlfq_quantum=0.1)
        s = Scheduler([engine], config)
        await s.start()
        pid = await s.open_program("a")
        other = await s.open_program("b")
        req = GenerateRequest(rid="A", text="p", sampling=SamplingParams(max_new_tokens=100))
        req2 = GenerateRequest(rid="B", text="p", sampling=SamplingParams(max_new_tokens=5))

        async def consume(stream):
            return [c async for c in stream]

        t = asyncio.create_task(consume(s.llm_call(pid, req)))
        await asyncio.sleep(0.3)
        await consume(s.llm_call(other, req2))
        await t
        assert engine.aborted == []
        await s.close()

    run_virtual(main())
