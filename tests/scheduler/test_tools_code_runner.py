"""The example code runner: statements run early, in a limited child process."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from scheduler.tools import CodeRunnerConfig, ToolExecutor, ToolRegistry
from scheduler.tools.builtin import register_builtin_tools
from scheduler.tools.code_runner import CodeRunnerTool
from scheduler.tools.partial import run_partial_tool

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def make_executor() -> AsyncIterator[Callable[..., ToolExecutor]]:
    registries: list[ToolRegistry] = []

    def make(**limits: object) -> ToolExecutor:
        registry = ToolRegistry()
        registry.config.code_runner = CodeRunnerConfig(**limits)
        register_builtin_tools(registry, code_runner=True)
        registries.append(registry)
        return ToolExecutor(registry)

    yield make
    for registry in registries:  # stop the warm spare children
        await registry.aclose()


async def slow_lines(lines: list[str], gap_s: float) -> AsyncIterator[str]:
    for line in lines:
        await asyncio.sleep(gap_s)
        yield line


async def test_statements_execute_while_the_code_is_still_being_written(
    make_executor: Callable[..., ToolExecutor],
) -> None:
    shared = tempfile.mkdtemp()  # under /tmp, reachable by the unprivileged child
    os.chmod(shared, 0o777)
    marker = Path(shared) / "ran"
    executor = make_executor()
    lines = [
        "```python\n",
        f"open({str(marker)!r}, 'w').write('x')\n",
        "total = sum(range(10))\n",
        "print('total', total)\n",
        "total * 2\n",
        "```\n",
    ]
    seen_early = False

    async def watched() -> AsyncIterator[str]:
        nonlocal seen_early
        async for chunk in slow_lines(lines, 0.2):
            if chunk == "total * 2\n":  # the file write ran before decoding got here
                seen_early = marker.exists()
            yield chunk

    result = await run_partial_tool(executor, "python", watched(), program_id="p", call_id="c")
    assert seen_early
    out = result.value
    assert out["ok"] and out["stdout"] == "total 45\n" and out["value"] == "90"
    assert out["statements_run"] == out["statements_total"] == 4
    assert result.tail_s < 0.3  # only the last statement ran after decoding
    shutil.rmtree(shared)


async def test_code_runner_enforces_its_wall_clock_limit(
    make_executor: Callable[..., ToolExecutor],
) -> None:
    executor = make_executor(timeout_s=1.0)
    t0 = time.monotonic()
    out = await executor.run(
        "python", {"code": "x = 1\nwhile True:\n    pass\nprint('never')\n"},
        program_id="p", call_id="c",
    )  # fmt: skip
    assert time.monotonic() - t0 < 5
    assert not out["ok"] and out["timed_out"] and "process killed" in out["error"]
    assert out["statements_run"] == 1  # `x = 1` ran; the loop was cut


async def test_code_runner_reports_its_cpu_limit_as_a_timeout(
    make_executor: Callable[..., ToolExecutor],
) -> None:
    executor = make_executor(timeout_s=30.0, cpu_s=1)  # the CPU limit strikes first
    t0 = time.monotonic()
    out = await executor.run(
        "python", {"code": "while True:\n    pass\n"}, program_id="p", call_id="c"
    )
    assert time.monotonic() - t0 < 20
    assert not out["ok"] and out["timed_out"], out
    assert "1 CPU seconds" in out["error"], out


async def test_child_has_no_environment_and_a_private_temp_cwd(
    make_executor: Callable[..., ToolExecutor],
) -> None:
    os.environ["PROGSERVE_TEST_SECRET"] = "hunter2"
    try:
        executor = make_executor()
        code = (
            "import os, sys\n"
            "print(sorted(k for k in os.environ if k != 'LC_CTYPE'))\n"
            "print(os.getcwd())\n"
            "print(sys.flags.isolated, sys.flags.no_site)\n"
            "print(os.getuid())\n"
        )
        out = await executor.run("python", {"code": code}, program_id="p", call_id="c")
    finally:
        del os.environ["PROGSERVE_TEST_SECRET"]
    env, cwd, flags, uid = out["stdout"].splitlines()
    assert env == "[]" and "hunter2" not in out["stdout"]
    assert os.path.basename(cwd).startswith("progserve-code-") and not os.path.exists(cwd)
    assert flags == "1 1"
    if os.geteuid() == 0:
        assert int(uid) != 0  # dropped to nobody


async def test_first_error_stops_the_script_and_is_reported(
    make_executor: Callable[..., ToolExecutor],
) -> None:
    executor = make_executor()
    code = "a = 1\nb = 1 / 0\nprint('not reached')\n"
    out = await executor.run("python", {"code": code}, program_id="p", call_id="c")
    assert not out["ok"] and "ZeroDivisionError" in out["error"]
    assert out["statements_run"] == 2 and out["stdout"] == ""


async def test_resource_limits_apply(make_executor: Callable[..., ToolExecutor]) -> None:
    executor = make_executor(memory_mb=128)
    code = "import os\ntry:\n    os.fork()\nexcept OSError as e:\n    print('fork', type(e).__name__)\nx = bytearray(512 * 1024 * 1024)\n"
    out = await executor.run("python", {"code": code}, program_id="p", call_id="c")
    if os.geteuid() != 0 or CodeRunnerTool().run_as is not None:
        assert out["stdout"].startswith("fork ")  # no new processes
    assert not out["ok"] and "MemoryError" in out["error"]


async def test_cancelling_the_program_kills_the_child(
    make_executor: Callable[..., ToolExecutor],
) -> None:
    executor = make_executor(timeout_s=30)
    task = asyncio.create_task(
        executor.run(
            "python", {"code": "import time\ntime.sleep(60)\n"}, program_id="p", call_id="c"
        )
    )
    await asyncio.sleep(0.5)
    assert executor.cancel_program("p") == 1
    t0 = time.monotonic()
    with pytest.raises(Exception, match="cancelled"):
        await task
    assert time.monotonic() - t0 < 2
