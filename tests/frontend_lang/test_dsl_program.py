"""The DSL's programming model on the embedded runtime (real scheduler, sim engine):
variables are handles, awaits batch the graph, control flow works on awaited values."""

from __future__ import annotations

import asyncio

import pytest

from frontend_lang import (
    NoActiveProgramError,
    fork,
    gen,
    join,
    let,
    program,
    select,
    tool,
)
from frontend_lang.context import current_context
from frontend_lang.errors import ProgramNotFoundError

SCRIPT = [
    {"pattern": r"Capital of France\?", "reply": "Paris"},
    {"pattern": r"Echo: (\w+)", "reply": r"echo \1"},
    {"pattern": r"Count: (\d+)\Z", "reply": r"\1"},
    {"pattern": r"Is it sunny\?", "reply": "yes"},
    {"pattern": r"Step:\Z", "reply": "a step"},
]


async def test_gen_returns_a_handle_at_once_and_the_value_on_await(make_local):
    runtime = await make_local(SCRIPT)

    @program
    async def ask() -> tuple[str, str]:
        answer = gen("Capital of France?", max_tokens=8, temperature=0, name="capital")
        assert answer.name == "capital"
        assert "{{capital}}" == f"{answer}"  # interpolation writes a placeholder
        return await answer, await answer.get()

    result = await ask.run(runtime)
    assert result.value == ("Paris", "Paris")
    assert result.state is not None and result.state.status == "finished"


async def test_calls_created_between_awaits_are_submitted_together(make_local):
    runtime = await make_local(SCRIPT)
    seen: dict[str, object] = {}

    @program
    async def chain() -> str:
        context = current_context()
        first = gen("Echo: one", max_tokens=8, temperature=0)
        second = gen(f"Echo: two {first}", max_tokens=8, temperature=0)
        third = gen(f"Echo: three {second}", max_tokens=8, temperature=0)
        with pytest.raises(ProgramNotFoundError):  # nothing was sent before the await
            await runtime.program_state(context.program_id)
        value = await third
        state = await runtime.program_state(context.program_id)
        seen["calls_after_first_await"] = [c.id for c in state.calls]
        seen["critical"] = {
            r.spec.id: r.spec.latency_critical for r in context.graph.calls.values()
        }
        return value

    result = await chain.run(runtime)
    assert result.value == "echo three"
    # The whole chain reached the scheduler at the first await, as one graph.
    assert seen["calls_after_first_await"] == ["gen_1", "gen_2", "gen_3"]
    # Only the awaited variable's call is marked latency-critical.
    assert seen["critical"] == {"gen_1": False, "gen_2": False, "gen_3": True}
    # Dependants read their inputs server-side: the prompt of gen_3 held gen_2's value.
    assert result.state is not None
    assert result.state.variables["gen_2"] == "echo two"


async def test_dynamic_control_flow_on_awaited_values(make_local):
    runtime = await make_local(SCRIPT)

    @program
    async def count_down(start: int) -> list[str]:
        seen = []
        n = start
        while n > 0:
            value = await gen(f"Count: {n}", max_tokens=4, temperature=0, name="count")
            seen.append(value)
            n = int(value) - 1
        return seen

    result = await count_down.run(runtime, 3)
    assert result.value == ["3", "2", "1"]
    assert result.calls == 3


async def test_select_returns_one_of_the_choices(make_local):
    runtime = await make_local(SCRIPT)

    @program
    async def weather() -> str:
        return await select("Is it sunny? Answer:", ["yes", "no"], name="answer")

    result = await weather.run(runtime)
    assert result.value == "yes"


async def test_fork_and_join_share_a_prefix_on_separate_threads(make_local):
    runtime = await make_local(SCRIPT)

    @program
    async def branches() -> list[str]:
        shared = "You solve puzzles carefully. " * 40
        forks = fork(3, shared + "Puzzle: stack the boxes.\n")
        for branch in forks:
            branch += f"Branch {branch.index}. Step:"
            branch.gen(max_tokens=8, temperature=0, name="step")
        summary = gen(f"Echo: joined\n{join(forks)}", max_tokens=8, temperature=0)
        await summary
        return await join(forks)

    result = await branches.run(runtime)
    assert result.value == ["a step"] * 3
    state = result.state
    assert state is not None
    steps = [c for c in state.calls if c.output and c.output.startswith("step")]
    assert len({c.thread_id for c in steps}) == 3
    # The later branches found the shared prefix in the engine's cache.
    assert sum(c.cached_tokens for c in steps) > 0


async def test_server_tool_output_feeds_a_prompt(make_local):
    runtime = await make_local(SCRIPT)

    @program
    async def compute() -> tuple[str, str]:
        total = tool("calculator", expression="17 * 23 + 4")
        echoed = gen(f"Echo: {total}", max_tokens=8, temperature=0)
        return await total, await echoed

    result = await compute.run(runtime)
    assert result.value == ("395", "echo 395")


async def test_client_side_tool_runs_here_and_its_value_reaches_the_server(make_local):
    runtime = await make_local(SCRIPT)
    calls: list[str] = []

    def shout(text: str) -> str:
        calls.append(text)
        return text.split()[-1].upper()

    async def reverse(text: str) -> str:
        await asyncio.sleep(0.01)
        return text[::-1]

    @program
    async def pipeline() -> tuple[str, str, str]:
        said = gen("Echo: hello", max_tokens=8, temperature=0)
        loud = tool(shout, text=said)
        back = tool(reverse, text=f"x{loud}")
        # A server call on a client-side value: held back until the value is known.
        echoed = gen(f"Echo: {back}", max_tokens=8, temperature=0)
        return await loud, await back, await echoed

    result = await pipeline.run(runtime)
    assert result.value == ("HELLO", "OLLEHx", "echo OLLEHx")
    assert calls == ["echo hello"]
    assert [t.call_id for t in result.client_tools] == ["tool_1", "tool_2"]


async def test_let_inputs_are_program_variables(make_local):
    runtime = await make_local(SCRIPT)

    @program
    async def with_input() -> str:
        word = let("alpha", name="word")
        first = await gen(f"Echo: {word}", max_tokens=8, temperature=0)
        late = let("beta")  # after the program started: inlined into the template
        second = await gen(f"Echo: {late}", max_tokens=8, temperature=0)
        return first + " / " + second

    result = await with_input.run(runtime)
    assert result.value == "echo alpha / echo beta"
    assert result.state is not None and result.state.variables["word"] == "alpha"


async def test_streaming_a_variable_gives_its_value_in_deltas(make_local):
    runtime = await make_local([{"pattern": "Tell", "reply": "one two three four five six"}])

    @program
    async def story() -> tuple[list[str], str]:
        text = gen("Tell a story", max_tokens=32, temperature=0)
        deltas = [d async for d in text.stream()]
        return deltas, await text

    result = await story.run(runtime)
    deltas, value = result.value
    assert value == "one two three four five six"
    assert "".join(deltas) == value and len(deltas) > 1


async def test_per_call_options_reach_the_engine(make_local):
    runtime = await make_local([{"pattern": "List", "reply": "a, b, c, d, e, f, g, h, i, j"}])

    @program
    async def options() -> tuple[str, str, str]:
        short = gen("List letters", max_tokens=3, temperature=0, name="short")
        stopped = gen("List letters again", max_tokens=64, stop=", d", name="stopped")
        choice = gen("List one", regex="(yes|no)", priority_hint=0.5, name="choice")
        return await short, await stopped, await choice

    result = await options.run(runtime)
    short, stopped, choice = result.value
    assert stopped == "a, b, c"
    assert choice in ("yes", "no")
    state = result.state
    assert state is not None
    by_output = {c.output: c for c in state.calls}
    assert by_output["short"].completion_tokens == 3
    assert len(short) < len("a, b, c, d, e, f, g, h, i, j")


async def test_nested_programs_run_as_part_of_the_caller(make_local):
    runtime = await make_local(SCRIPT)

    @program
    async def helper(word: str) -> str:
        return await gen(f"Echo: {word}", max_tokens=8, temperature=0)

    @program
    async def outer() -> list[str]:
        return list(await asyncio.gather(helper("a"), helper("b")))

    result = await outer.run(runtime)
    assert result.value == ["echo a", "echo b"]
    assert result.calls == 2  # one program, two calls


async def test_primitives_outside_a_program_raise():
    with pytest.raises(NoActiveProgramError, match="inside an @program"):
        gen("hello")


async def test_a_variable_is_not_its_value(make_local):
    runtime = await make_local(SCRIPT)

    @program
    async def misuse() -> None:
        answer = gen("Capital of France?", max_tokens=4)
        with pytest.raises(TypeError, match="await"):
            if answer:  # a handle has no truth value
                pass
        with pytest.raises(TypeError, match="await"):
            f"{answer:>10}"  # noqa: B018 - format specs need the value

    await misuse.run(runtime)


async def test_client_tools_take_lambdas_and_joined_variables(make_local):
    runtime = await make_local(SCRIPT)

    @program
    async def gather_words() -> str:
        words = [gen(f"Echo: {w}", max_tokens=8, temperature=0) for w in ("red", "green")]
        combined = tool(lambda parts: " + ".join(parts), parts=join(words))
        return await combined

    result = await gather_words.run(runtime)
    assert result.value == "echo red + echo green"
