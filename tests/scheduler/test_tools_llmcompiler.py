"""LLMCompiler: plan parsing, malformed plans, a streamed plan's tasks run on the
scheduler's data-flow graph (the only task-graph executor), and the joiner's answer
format. Timing runs on the virtual-time loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from engine_backend.sim.config import SimConfig
from engine_backend.sim.engine import SimEngine
from engine_backend.virtual_time import run_virtual
from scheduler.config import SchedulerConfig
from scheduler.scheduler import Scheduler
from scheduler.spec import CallState, ProgramSpec
from scheduler.tools import (
    JoinerOutputError,
    PlanCycleError,
    PlanReferenceError,
    PlanSyntaxError,
    PlanUnknownToolError,
    ToolExecutor,
    ToolRegistry,
)
from scheduler.tools.builtin import SimulatedSearch, calculator
from scheduler.tools.llmcompiler import (
    Ref,
    parse_joiner_output,
    parse_plan,
    scratchpad_template,
    submit_plan,
    task_call,
)

PLAN = """Thought: I need both populations first.
1. search("population of Paris")
2. search('population of ${1} neighbours')
Thought: Now add them.
3. calculator(expression="$1 + $2")
4. join()<END_OF_PLAN>
ignored trailing text
"""


def registry_with(latency: dict[str, float] | None = None) -> ToolRegistry:
    latency = latency or {}
    registry = ToolRegistry()
    answers = {"population of Paris": 2100000, "population of Rome": 2800000}
    registry.register(
        "search", SimulatedSearch(lambda q: latency.get(q, 1.0), answers), idempotent=True
    )
    registry.register("calculator", calculator)
    return registry


def test_plan_format_is_parsed() -> None:
    tasks = parse_plan(PLAN, registry_with())
    assert list(tasks) == [1, 2, 3, 4]
    assert tasks[1].thought == "I need both populations first."
    assert tasks[1].args == ["population of Paris"] and tasks[1].dependencies == ()
    assert tasks[2].dependencies == (1,) and tasks[2].thought is None
    assert tasks[3].kwargs == {"expression": "$1 + $2"} and tasks[3].dependencies == (1, 2)
    assert tasks[3].thought == "Now add them."
    assert tasks[4].is_join and tasks[4].dependencies == (1, 2, 3)


def test_bare_references_become_values_and_literals_are_never_evaluated() -> None:
    registry = registry_with()
    registry.register("pair", lambda a, b=None: (a, b))
    tasks = parse_plan('1. search("x")\n2. pair($1, b=[${1}, "$1", {"k": 3}])\n', registry)
    assert tasks[2].args == [Ref(1)]
    assert tasks[2].kwargs == {"b": [Ref(1), "$1", {"k": 3}]}
    with pytest.raises(PlanSyntaxError, match="literals"):
        parse_plan('1. search(__import__("os").system("id"))\n', registry)
    with pytest.raises(PlanSyntaxError, match="literals"):
        parse_plan("1. search(open)\n", registry)


@pytest.mark.parametrize(
    ("plan", "error", "message"),
    [
        ('1. search("a")\n2. search("$3")\n3. search("b")\n', PlanReferenceError, "later task"),
        ('1. search("$1")\n', PlanReferenceError, "itself"),
        ('2. search("a")\n3. search("$1")\n', PlanReferenceError, "refers to no task"),
        ('1. search("$2")\n2. search("$1")\n', PlanCycleError, r"cycle: \$1 -> \$2 -> \$1"),
        ('1. shell("rm -rf /")\n', PlanUnknownToolError, "unknown tool 'shell'"),
        ('1. search("a")\n1. search("b")\n', PlanSyntaxError, "strictly increase"),
        ('1. search("a"\n', PlanSyntaxError, r"N\. tool"),
        ('1. search("a", "b", "c")\n', PlanSyntaxError, "bad arguments for 'search'"),
        ("1. join(1)\n", PlanSyntaxError, "no arguments"),
        ('1. search(*["a"])\n', PlanSyntaxError, "not allowed"),
    ],
)
def test_malformed_plans_give_typed_errors(plan: str, error: type, message: str) -> None:
    with pytest.raises(error, match=message) as info:
        parse_plan(plan, registry_with())
    assert info.value.status_code == 400 and "malformed plan" in str(info.value)


async def stream(text: str, every_s: float, chunk: int = 5) -> AsyncIterator[str]:
    for i in range(0, len(text), chunk):
        await asyncio.sleep(every_s)
        yield text[i : i + chunk]


@asynccontextmanager
async def graph_of(registry: ToolRegistry) -> AsyncIterator[tuple[Scheduler, ToolExecutor]]:
    """A scheduler (sim engine) whose graph runs the registry's tools, and an empty
    program `p` that the plan's tasks are added to."""
    executor = ToolExecutor(registry)
    scheduler = Scheduler([SimEngine(SimConfig())], SchedulerConfig(), tools=executor)
    await scheduler.start()
    try:
        await scheduler.submit_program(ProgramSpec(program_id="p"))
        yield scheduler, executor
    finally:
        await scheduler.close()
        await executor.aclose()


async def settled(scheduler: Scheduler, *ids: str) -> dict[str, CallState]:
    """The calls' states once each has ended (its variable written or failed)."""
    for call_id in ids:
        with contextlib.suppress(Exception):
            await scheduler.wait_variable("p", call_id)
    return {c.id: c for c in scheduler.program_state("p").calls}


def test_streamed_plan_starts_tasks_on_the_graph_before_the_plan_ends() -> None:
    async def main() -> None:
        registry = registry_with()
        async with graph_of(registry) as (scheduler, _):
            plan = await submit_plan(scheduler, "p", stream(PLAN, 0.05), registry)
            calls = await settled(scheduler, "task_1", "task_2", "task_3")
            t1, t2, t3 = calls["task_1"], calls["task_2"], calls["task_3"]
            assert t1.dispatched_at < plan.plan_done_at
            assert t1.dispatched_at == pytest.approx(plan.tasks[1].parsed_at)  # at once
            assert t2.dispatched_at == pytest.approx(t1.finished_at)  # right when $1 is done
            assert t3.dispatched_at == pytest.approx(max(t1.finished_at, t2.finished_at))
            assert await scheduler.wait_variable("p", "task_2") == (
                "no result for 'population of 2100000 neighbours'")
            assert t3.status == "failed" and "calculator" in (t3.error or "")

    run_virtual(main())


def test_independent_tasks_run_in_parallel_and_dependants_wait() -> None:
    async def main() -> None:
        registry = registry_with({"a": 1.0, "b": 3.0, "c": 2.0})
        plan = '1. search("a")\n2. search("b")\n3. search("c")\n4. calculator("1 + 2")\njoin()'
        async with graph_of(registry) as (scheduler, _):
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await submit_plan(scheduler, "p", stream(plan, 0.0, chunk=len(plan)), registry)
            await settled(scheduler, "task_1", "task_2", "task_3", "task_4")
            assert loop.time() - t0 == pytest.approx(3.0)  # the critical path, not 6 s
            assert await scheduler.wait_variable("p", "task_4") == "3"

    run_virtual(main())


def test_failed_task_fails_its_dependants_and_others_still_run() -> None:
    async def main() -> None:
        registry = registry_with()
        plan = '1. calculator("1/0")\n2. calculator("$1 * 2")\n3. calculator("2+2")\n4. join()'
        async with graph_of(registry) as (scheduler, _):
            tasks = (await submit_plan(scheduler, "p", stream(plan, 0.0), registry)).tasks
            calls = await settled(scheduler, "task_1", "task_2", "task_3")
            assert "division by zero" in (calls["task_1"].error or "")
            assert calls["task_2"].status == "failed"
            assert calls["task_3"].status == "finished"
            assert await scheduler.wait_variable("p", "task_3") == "4"
            pad = scratchpad_template(tasks)
            assert "Observation: {{task_3}}" in pad and "join" not in pad

    run_virtual(main())


def test_malformed_streamed_plan_raises_and_cancelling_stops_started_tasks() -> None:
    async def main() -> None:
        registry = registry_with({"slow": 100.0})
        plan = '1. search("slow")\n2. search("$5")\n'
        async with graph_of(registry) as (scheduler, executor):
            with pytest.raises(PlanReferenceError):
                await submit_plan(scheduler, "p", stream(plan, 0.01), registry)
            assert executor.running_calls("p") == 1  # task 1 started on the graph
            await scheduler.cancel_program("p")
            await asyncio.sleep(1.0)  # well before the search's 100 s
            assert executor.running_calls("p") == 0
            assert executor.stats()["search"]["cancelled"] == 1

    run_virtual(main())


def test_a_task_becomes_a_graph_tool_call_with_variable_references() -> None:
    registry = registry_with()
    tasks = parse_plan('1. search("x")\n2. calculator(expression=$1)\n3. search("$1 and ${2}")',
                       registry)
    call = task_call(tasks[3], registry, program_id="p")
    assert (call.id, call.kind, call.tool, call.output) == ("task_3", "tool", "search", "task_3")
    assert call.args == {"query": "{{task_1}} and {{task_2}}"}
    assert set(call.input_variables()) == {"task_1", "task_2"}
    assert task_call(tasks[2], registry, program_id="p").args == {"expression": "{{task_1}}"}


def test_joiner_output_parsing() -> None:
    assert parse_joiner_output("Thought: x\nAction: Finish(the answer (yes))").answer == (
        "the answer (yes)"
    )
    assert parse_joiner_output("Action: Replan(more data)").replan
    with pytest.raises(JoinerOutputError):
        parse_joiner_output("I think the answer is 4")
