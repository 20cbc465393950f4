"""Tools inside the schedule: the real Scheduler runs tool nodes through the ToolExecutor
(sim engine, virtual time). A hanging tool is cut and its program gets a clear error."""

from __future__ import annotations

import asyncio

import pytest

from engine_backend.sim.config import SimConfig
from engine_backend.sim.engine import SimEngine
from engine_backend.virtual_time import run_virtual
from scheduler.config import SchedulerConfig
from scheduler.errors import CallFailedError
from scheduler.scheduler import Scheduler
from scheduler.spec import CallSpec, ProgramSpec
from scheduler.tools import ToolExecutor, ToolRegistry
from scheduler.tools.builtin import calculator


def program(tool: str, args: dict[str, str]) -> ProgramSpec:
    return ProgramSpec(
        inputs={"question": "what is 6 times 7?"},
        calls=[
            CallSpec(id="think", prompt="Q: {{question}}", output="thought",
                     sampling={"max_new_tokens": 8}),
            CallSpec(id="act", kind="tool", tool=tool, args=args, output="result",
                     parents=["think"]),
        ],
    )  # fmt: skip


def test_tool_node_runs_in_the_schedule_and_a_hang_fails_its_program_clearly() -> None:
    async def main() -> None:
        registry = ToolRegistry()
        registry.register("calculator", calculator)

        async def hang(x: str) -> str:
            await asyncio.Event().wait()
            return x

        registry.register("hang", hang, timeout_s=3.0)
        executor = ToolExecutor(registry)
        engine = SimEngine(SimConfig())
        async with Scheduler([engine], SchedulerConfig(), tools=executor) as scheduler:
            ok = await scheduler.submit_program(program("calculator", {"expression": "6*7"}))
            assert await scheduler.wait_variable(ok, "result") == "42"

            loop = asyncio.get_running_loop()
            t0 = loop.time()
            bad = await scheduler.submit_program(program("hang", {"x": "{{thought}}"}))
            with pytest.raises(CallFailedError) as info:
                await scheduler.wait_variable(bad, "result")
            assert 3.0 <= loop.time() - t0 < 4.0  # the LLM call, then 3 s of tool
            message = str(info.value)
            assert "tool 'hang'" in message and "timed out after 3 s and was cut" in message
            assert info.value.status_code == 502
            assert executor.stats()["hang"]["timed_out"] == 1
        await engine.close()

    run_virtual(main())
