"""LLMCompiler: plan parsing, malformed plans, the streaming task-fetching unit, and the
joiner's replanning. Timing runs on the virtual-time loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from engine_backend.virtual_time import run_virtual
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
    LLMCompiler,
    Ref,
    TaskFetchingUnit,
    parse_joiner_output,
    parse_plan,
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


def test_streaming_unit_starts_tasks_before_the_plan_ends() -> None:
    async def main() -> None:
        executor = ToolExecutor(registry_with())
        unit = TaskFetchingUnit(executor, program_id="p")
        run = await unit.run(stream(PLAN, 0.05))
        t1, t2, t3 = run.tasks[1], run.tasks[2], run.tasks[3]
        assert t1.started_at is not None and t1.started_at < run.plan_done_at
        assert t1.started_at == pytest.approx(t1.parsed_at)  # no dependencies: at once
        assert t2.started_at == pytest.approx(t1.finished_at)  # right when $1 is done
        assert t3.started_at == pytest.approx(max(t1.finished_at, t2.finished_at))
        assert t2.observation == "no result for 'population of 2100000 neighbours'"
        assert t3.error is not None  # "2100000 + no result..." is not arithmetic
        assert "calculator" in str(t3.error)

    run_virtual(main())


def test_independent_tasks_run_in_parallel_and_dependants_wait() -> None:
    async def main() -> None:
        latency = {"a": 1.0, "b": 3.0, "c": 2.0}
        registry = registry_with(latency)
        executor = ToolExecutor(registry)
        plan = '1. search("a")\n2. search("b")\n3. search("c")\n4. calculator("1 + 2")\njoin()'
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        run = await TaskFetchingUnit(executor, program_id="p").run(plan)
        assert loop.time() - t0 == pytest.approx(3.0)  # the critical path, not 6 s
        assert run.results()[4] == 3

    run_virtual(main())


def test_failed_task_skips_its_dependants_and_others_still_run() -> None:
    async def main() -> None:
        registry = registry_with()
        executor = ToolExecutor(registry)
        plan = '1. calculator("1/0")\n2. calculator("$1 * 2")\n3. calculator("2+2")\n4. join()'
        run = await TaskFetchingUnit(executor, program_id="p").run(plan)
        assert "division by zero" in str(run.tasks[1].error)
        assert "depends on failed task(s) $1" in str(run.tasks[2].error)
        assert run.tasks[3].observation == 4
        assert "Error:" in run.scratchpad() and "Observation: 4" in run.scratchpad()

    run_virtual(main())


def test_malformed_streamed_plan_cancels_started_tasks() -> None:
    async def main() -> None:
        registry = registry_with({"slow": 100.0})
        executor = ToolExecutor(registry)
        plan = '1. search("slow")\n2. search("$5")\n'
        with pytest.raises(PlanReferenceError):
            await TaskFetchingUnit(executor, program_id="p").run(stream(plan, 0.01))
        assert executor.running_calls("p") == 0
        assert executor.stats()["search"]["cancelled"] == 1

    run_virtual(main())


def test_joiner_replans_up_to_the_limit() -> None:
    async def main() -> None:
        registry = registry_with()
        executor = ToolExecutor(registry)
        plans: list[str | None] = []
        joins: list[bool] = []

        async def planner(question: str, context: str | None) -> AsyncIterator[str]:
            plans.append(context)
            async for delta in stream(f'1. calculator("{len(plans)} * 10")\n2. join()', 0.01):
                yield delta

        async def joiner(question: str, scratchpad: str, final: bool) -> str:
            joins.append(final)
            return "Thought: not sure yet\nAction: Replan(need more)"

        compiler = LLMCompiler(executor, planner, joiner, max_replans=2)
        result = await compiler.run("q", program_id="p")
        assert len(result.rounds) == 3 and result.replans == 2
        assert joins == [False, False, True]
        assert plans[0] is None
        assert "Previous Plan" in plans[2] and "Observation: 20" in plans[2]
        assert result.answer == "need more"  # the final round cannot replan

    run_virtual(main())


def test_joiner_can_finish_at_once() -> None:
    async def main() -> None:
        executor = ToolExecutor(registry_with())

        async def planner(question: str, context: str | None) -> AsyncIterator[str]:
            yield '1. calculator("6*7")\n2. join()<END_OF_PLAN>'

        async def joiner(question: str, scratchpad: str, final: bool) -> str:
            assert "Observation: 42" in scratchpad
            return "Thought: done\nAction: Finish(42)"

        result = await LLMCompiler(executor, planner, joiner, max_replans=3).run(
            "q", program_id="p"
        )
        assert result.answer == "42" and result.thought == "done" and result.replans == 0

    run_virtual(main())


def test_joiner_output_parsing() -> None:
    assert parse_joiner_output("Thought: x\nAction: Finish(the answer (yes))").answer == (
        "the answer (yes)"
    )
    assert parse_joiner_output("Action: Replan(more data)").replan
    with pytest.raises(JoinerOutputError):
        parse_joiner_output("I think the answer is 4")
