"""DSL errors name the variable and the call: unknown references, cycles, tools that
raise (server-side and client-side), dependants of a failed call; cancellation cancels
everything in flight."""

from __future__ import annotations

import asyncio

import pytest

from frontend_lang import (
    CallFailedError,
    CycleError,
    ProgramDefinitionError,
    UnknownVariableError,
    gen,
    program,
    tool,
)
from frontend_lang.context import current_context

SCRIPT = [{"pattern": r"Echo: (\w+)", "reply": r"echo \1"}]
THIS_FILE = "test_dsl_errors.py"


async def test_unknown_variable_names_the_variable_and_the_call(make_local):
    runtime = await make_local(SCRIPT)

    @program
    async def typo() -> str:
        answer = gen("Echo: hi", max_tokens=4, name="answer")
        summary = gen("Summarise {{answr}}", max_tokens=4, name="summary")
        return await summary + await answer

    with pytest.raises(UnknownVariableError) as info:
        await typo.run(runtime)
    error = info.value
    assert (error.variable, error.call_id) == ("answr", "gen_2")
    message = str(error)
    assert "'answr'" in message and "'gen_2'" in message and THIS_FILE in message
    assert "answer" in message  # the known variables, to spot the typo


async def test_cycle_names_the_variable_and_the_call(make_local):
    runtime = await make_local(SCRIPT)

    @program
    async def loop() -> str:
        # Forward references by name can close a cycle: a reads b, b reads a.
        a = gen("Use {{b}}", max_tokens=4, name="a")
        gen("Use {{a}}", max_tokens=4, name="b")
        return await a

    with pytest.raises(CycleError) as info:
        await loop.run(runtime)
    error = info.value
    assert error.variable in ("a", "b") and error.call_id in ("gen_1", "gen_2")
    assert "cycle" in str(error) and f"'{error.variable}'" in str(error)
    assert "gen_1(a)" in str(error) and "gen_2(b)" in str(error)


async def test_a_server_tool_that_raises_fails_its_variable_and_its_dependants(make_local):
    runtime = await make_local(SCRIPT)

    @program
    async def divide() -> str:
        ratio = tool("calculator", expression="1 / 0", name="ratio")
        report = gen(f"Echo: {ratio}", max_tokens=8, name="report")
        try:
            await ratio
        except CallFailedError as exc:
            direct = exc
        else:
            raise AssertionError("the tool should have failed")
        assert (direct.call_id, direct.variable) == ("tool_1", "ratio")
        assert "division by zero" in str(direct).lower() and THIS_FILE in str(direct)
        return await report

    with pytest.raises(CallFailedError) as info:
        await divide.run(runtime)
    error = info.value
    # The dependant's error names it, and the root cause with its own call and variable.
    assert (error.call_id, error.variable) == ("gen_1", "report")
    message = str(error)
    assert "'report'" in message and "'gen_1'" in message
    assert "'ratio'" in message and "'tool_1'" in message


async def test_a_client_tool_that_raises_names_the_tool_call(make_local):
    runtime = await make_local(SCRIPT)

    def parse_number(text: str) -> int:
        return int(text)

    @program
    async def parse() -> str:
        said = gen("Echo: seven", max_tokens=8)
        number = tool(parse_number, text=said, name="number")
        follow = gen(f"Echo: {number}", max_tokens=8, name="follow")
        return await follow

    with pytest.raises(CallFailedError) as info:
        await parse.run(runtime)
    error = info.value
    assert (error.call_id, error.variable) == ("gen_2", "follow")
    message = str(error)
    assert "'number'" in message and "'tool_1'" in message
    assert "ValueError" in message and "invalid literal" in message


async def test_an_unknown_server_tool_is_a_clear_failure(make_local):
    runtime = await make_local(SCRIPT)

    @program
    async def missing() -> str:
        return await tool("no_such_tool", x=1, name="result")

    with pytest.raises(CallFailedError) as info:
        await missing.run(runtime)
    assert info.value.variable == "result" and "no_such_tool" in str(info.value)


async def test_bad_options_name_the_call(make_local):
    runtime = await make_local(SCRIPT)

    @program
    async def bad() -> str:
        return await gen("Echo: x", max_tokens=-1)

    with pytest.raises(ProgramDefinitionError, match=r"gen_1.*max_new_tokens"):
        await bad.run(runtime)


async def test_a_variable_of_another_run_is_refused(make_local):
    runtime = await make_local(SCRIPT)
    leaked = []

    @program
    async def first() -> str:
        value = gen("Echo: one", max_tokens=4)
        leaked.append(value)
        return await value

    @program
    async def second() -> str:
        return await leaked[0]

    await first.run(runtime)
    with pytest.raises(ProgramDefinitionError, match="another program"):
        await second.run(runtime)


async def test_cancelling_a_program_cancels_its_calls_in_flight(make_local):
    runtime = await make_local([{"pattern": "Write", "reply": "word " * 4000}])
    started = asyncio.Event()
    ids: list[str] = []

    @program
    async def long_story() -> list[str]:
        ids.append(current_context().program_id)
        parts = [gen(f"Write part {i}", max_tokens=4000, name="part") for i in range(3)]
        tail = gen("Write the end after {{part}}", max_tokens=100, name="tail")
        started.set()
        return [await p for p in parts] + [await tail]

    task = asyncio.create_task(long_story.run(runtime))
    await started.wait()
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    state = await runtime.program_state(ids[0])
    assert state.status == "cancelled"
    assert {c.status for c in state.calls} <= {"cancelled", "failed"}
    stats = await runtime.scheduler.stats()
    assert stats.running == 0  # nothing left on the engine


async def test_a_program_that_raises_is_cancelled(make_local):
    runtime = await make_local([{"pattern": "Write", "reply": "word " * 4000}])
    ids: list[str] = []

    @program
    async def fails() -> None:
        ids.append(current_context().program_id)
        background = gen("Write a lot", max_tokens=4000)
        await gen("Echo: x", max_tokens=4)
        raise RuntimeError(f"the program gave up on {background.name}")

    with pytest.raises(RuntimeError, match="gave up"):
        await fails.run(runtime)
    state = await runtime.program_state(ids[0])
    assert state.status == "cancelled"
    by_id = {c.id: c.status for c in state.calls}
    assert by_id["gen_1"] == "cancelled" and by_id["gen_2"] == "finished"
