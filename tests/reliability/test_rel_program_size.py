"""A call costs the same in a big program as in a small one: a 5,000-call program and
5,000 one-call programs are within 2x of each other in CPU time and peak memory, for every
shape a program can take at scale (independent calls, a chain, a fan-in by parents, a join
over 5,000 variables, a program grown one call at a time).

Regression: a finished call re-pushed every queued call of its program into the policy's
heap (quadratic time, and stale heap entries kept for each), and validating or adding a
batch of calls copied the program's whole variable table: a 1,500-call program made 1.09M
heap pushes; 2,000 calls in one program took 28.7 s against 4.9 s for 2,000 one-call
programs; three programs at the documented limits took RSS to 3.7 GB in 2 minutes.

Runs on the sim engine in virtual time; both sides of each comparison run in this process,
one after the other. Time is CPU time (not wall time: the machine is shared); memory is the
growth of the interpreter's allocated blocks (`sys.getallocatedblocks`) over the run,
sampled every few virtual milliseconds (tracemalloc would slow every run fourfold). A side
that runs past its budget is stopped, so a regression fails in seconds, not minutes.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import Callable

import pytest

from engine_backend.sim.config import SimConfig
from engine_backend.sim.engine import SimEngine
from engine_backend.virtual_time import run_virtual
from scheduler.config import SchedulerConfig
from scheduler.scheduler import Scheduler
from scheduler.spec import CallSpec, ProgramSpec

N = 5000
RATIO = 2.0
SAMPLING = {"max_new_tokens": 1}


def llm(cid: str, prompt: str, output: str, **kw: object) -> CallSpec:
    return CallSpec(id=cid, prompt=prompt, output=output, sampling=SAMPLING, **kw)


def independent(n: int) -> list[CallSpec]:
    return [llm(f"c{i}", f"task {i}", f"v{i}") for i in range(n)]


def chain(n: int) -> list[CallSpec]:
    return [llm("c0", "start", "v0")] + [
        llm(f"c{i}", f"go on from {{{{v{i - 1}}}}}", f"v{i}") for i in range(1, n)]


def fan_in(n: int) -> list[CallSpec]:
    return independent(n - 1) + [llm("join", "join them", "j",
                                     parents=[f"c{i}" for i in range(n - 1)])]


def variable_join(n: int) -> list[CallSpec]:
    return independent(n - 1) + [
        llm("join", "".join(f"{{{{v{i}}}}}" for i in range(n - 1)), "j")]


async def one_call_programs(scheduler: Scheduler) -> None:
    ids = [await scheduler.submit_program(ProgramSpec(calls=independent(1))) for _ in range(N)]
    for pid in ids:
        await scheduler.wait_variable(pid, "v0")


def one_program(make: Callable[[int], list[CallSpec]]) -> Callable[[Scheduler], object]:
    async def run(scheduler: Scheduler) -> None:
        calls = make(N)
        pid = await scheduler.submit_program(ProgramSpec(calls=calls))
        for call in calls:
            await scheduler.wait_variable(pid, call.output)
    return run


async def grown_one_call_at_a_time(scheduler: Scheduler) -> None:
    pid = await scheduler.submit_program(ProgramSpec(calls=chain(1)))
    for i in range(1, N):
        await scheduler.add_calls(pid, [llm(f"c{i}", f"go on from {{{{v{i - 1}}}}}", f"v{i}")])
    await scheduler.wait_variable(pid, f"v{N - 1}")


class OverBudget(Exception):
    pass


def measure(run: Callable[[Scheduler], object], policy: str, budget_s: float = float("inf")
            ) -> tuple[float, int]:
    """CPU seconds and peak allocated-block growth of one run, stopped past `budget_s`.
    The sampler's own time is left out: counting blocks walks the whole heap, so it costs
    more in a big test session, and a long-running shape is sampled more often."""
    peak = 0
    sampling = 0.0

    async def main() -> None:
        nonlocal peak, sampling
        scheduler = Scheduler([SimEngine(SimConfig(stream_interval=0))],
                              SchedulerConfig(policy=policy))
        await scheduler.start()
        work = asyncio.ensure_future(run(scheduler))  # type: ignore[arg-type]
        try:
            while not work.done():  # sampler and watchdog, in virtual time
                await asyncio.wait([work], timeout=0.02)
                before_sample = time.process_time()
                peak = max(peak, sys.getallocatedblocks())
                sampling += time.process_time() - before_sample
                if time.process_time() - start - sampling > budget_s:
                    raise OverBudget
            work.result()
        finally:
            work.cancel()
            await scheduler.close()

    # Objects the test session made before are frozen, so the collector's full passes
    # cost the same in any session (the chain makes far more of them than the batches).
    gc.collect()
    gc.freeze()
    before = sys.getallocatedblocks()
    start = time.process_time()
    try:
        run_virtual(main())
    finally:
        gc.unfreeze()
    return time.process_time() - start - sampling, peak - before


@pytest.fixture(scope="module")
def small_programs() -> Callable[[str], tuple[float, int]]:
    """N one-call programs under a policy, measured once per policy."""
    measured: dict[str, tuple[float, int]] = {}

    def get(policy: str) -> tuple[float, int]:
        if policy not in measured:
            measured[policy] = measure(one_call_programs, policy)
        return measured[policy]

    return get


@pytest.mark.parametrize(("shape", "policy"), [
    pytest.param(one_program(independent), "atlas", id="independent"),
    # PLAS ranks by the program's service, which grows while its calls wait: they move
    # down the queues and anti-starvation watches them.
    pytest.param(one_program(independent), "plas", id="independent-plas"),
    pytest.param(one_program(chain), "atlas", id="chain"),
    pytest.param(one_program(fan_in), "atlas", id="fan-in"),
    pytest.param(one_program(variable_join), "atlas", id="variable-join"),
    pytest.param(grown_one_call_at_a_time, "atlas", id="grown"),
])
def test_a_big_program_costs_what_as_many_small_ones_cost(small_programs, shape, policy):
    small_cpu, small_peak = small_programs(policy)
    try:
        big_cpu, big_peak = measure(shape, policy, budget_s=RATIO * small_cpu + 1.0)
    except OverBudget:
        pytest.fail(f"one {N}-call program ran past {RATIO}x the CPU time of {N} one-call "
                    f"programs ({small_cpu:.2f} s)")
    assert big_cpu <= RATIO * small_cpu, (big_cpu, small_cpu)
    assert big_peak <= RATIO * small_peak, (big_peak, small_peak)
