"""ToolExecutor: limits, timeouts, retries, cancellation, records. Timing-sensitive cases
run on the virtual-time loop, so they are exact and take no wall time."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine_backend.virtual_time import run_virtual
from scheduler.tools import (
    ToolArgumentError,
    ToolCallRecord,
    ToolCancelledError,
    ToolError,
    ToolExecutor,
    ToolFailedError,
    ToolRegistry,
    ToolsConfig,
    ToolTimeoutError,
    UnknownToolError,
)


def make(config: ToolsConfig | None = None) -> tuple[ToolRegistry, ToolExecutor]:
    registry = ToolRegistry(config or ToolsConfig(backoff_jitter=0.0))
    return registry, ToolExecutor(registry, seed=0)


def test_flood_never_exceeds_concurrency_limit_and_loses_nothing() -> None:
    async def main() -> None:
        registry, executor = make()
        running = peak = 0

        async def slow(i: int) -> int:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01 * (1 + i % 7))
            running -= 1
            return i * i

        registry.register("slow", slow, max_concurrency=2)
        results = await asyncio.gather(
            *(executor.run("slow", {"i": i}, program_id=f"p{i % 5}", call_id=f"c{i}")
              for i in range(500))
        )  # fmt: skip
        assert results == [i * i for i in range(500)]
        assert peak == 2
        stats = executor.stats()["slow"]
        assert stats["completed"] == 500 and stats["peak_running"] == 2
        assert stats["running"] == 0 and stats["queued"] == 0

    run_virtual(main())


def test_sync_tool_flood_respects_limit_in_threads() -> None:
    async def main() -> None:
        registry, executor = make()
        lock = threading.Lock()
        running = peak = 0

        def work(x: int) -> int:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
            time.sleep(0.002)
            with lock:
                running -= 1
            return x + 1

        registry.register("work", work, max_concurrency=2)
        out = await asyncio.gather(
            *(executor.run("work", {"x": i}, program_id="p", call_id=str(i)) for i in range(60))
        )
        assert out == [i + 1 for i in range(60)]
        assert peak == 2
        await executor.aclose()

    asyncio.run(main())


def test_rate_limit_spaces_starts() -> None:
    async def main() -> None:
        registry, executor = make()
        starts: list[float] = []
        loop = asyncio.get_running_loop()

        async def ping() -> None:
            starts.append(loop.time())

        registry.register("ping", ping, rate_limit=3, rate_period_s=1.0)
        await asyncio.gather(
            *(executor.run("ping", {}, program_id="p", call_id=str(i)) for i in range(10))
        )
        assert len(starts) == 10
        for i in range(len(starts)):  # any 1 s window holds at most 3 starts
            assert sum(1 for s in starts if starts[i] <= s < starts[i] + 1.0) <= 3
        assert starts[-1] - starts[0] == pytest.approx(3.0)

    run_virtual(main())


def test_hanging_tool_is_cut_at_its_timeout_with_a_clear_error() -> None:
    async def main() -> None:
        registry, executor = make()
        records: list[ToolCallRecord] = []
        executor.add_listener(records.append)

        async def hang() -> None:
            await asyncio.Event().wait()

        registry.register("hang", hang, timeout_s=2.5)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ToolTimeoutError) as info:
            await executor.run("hang", {}, program_id="prog-7", call_id="call-3")
        assert loop.time() - t0 == pytest.approx(2.5)
        message = str(info.value)
        assert "'hang'" in message and "call-3" in message and "prog-7" in message
        assert "timed out after 2.5 s" in message
        assert isinstance(info.value, ToolError) and info.value.status_code == 504
        assert records[-1].outcome == "timeout" and executor.stats()["hang"]["timed_out"] == 1

    run_virtual(main())


def test_hanging_sync_tool_times_out_but_keeps_its_slot_until_the_thread_ends() -> None:
    async def main() -> None:
        registry, executor = make()
        release = threading.Event()
        registry.register("block", lambda: release.wait(5), timeout_s=0.05, max_concurrency=1)
        with pytest.raises(ToolTimeoutError):
            await executor.run("block", {}, program_id="p", call_id="a")
        assert executor.stats()["block"]["running"] == 1  # the thread still runs
        release.set()
        for _ in range(100):
            if executor.stats()["block"]["running"] == 0:
                break
            await asyncio.sleep(0.01)
        assert executor.stats()["block"]["running"] == 0
        await executor.aclose()

    asyncio.run(main())


def test_retries_with_backoff_for_idempotent_tools_only() -> None:
    async def main() -> None:
        registry, executor = make(ToolsConfig(backoff_base_s=0.5, backoff_jitter=0.0))
        loop = asyncio.get_running_loop()
        calls: dict[str, list[float]] = {"flaky": [], "effect": []}

        def failing(name: str, succeed_on: int):
            async def tool() -> str:
                calls[name].append(loop.time())
                if len(calls[name]) < succeed_on:
                    raise ConnectionError("upstream reset")
                return "ok"

            return tool

        registry.register("flaky", failing("flaky", 3), idempotent=True, max_retries=3)
        registry.register("effect", failing("effect", 3), idempotent=False, max_retries=3)
        assert await executor.run("flaky", {}, program_id="p", call_id="1") == "ok"
        gaps = [b - a for a, b in zip(calls["flaky"], calls["flaky"][1:], strict=False)]
        assert gaps == [pytest.approx(0.5), pytest.approx(1.0)]  # exponential backoff
        with pytest.raises(ToolFailedError) as info:
            await executor.run("effect", {}, program_id="p", call_id="2")
        assert len(calls["effect"]) == 1  # never retried: not idempotent
        assert "ConnectionError: upstream reset" in str(info.value)
        assert executor.stats()["flaky"]["retries"] == 2

    run_virtual(main())


def test_retries_give_up_and_say_how_many_attempts() -> None:
    async def main() -> None:
        registry, executor = make()

        async def broken() -> None:
            raise RuntimeError("boom")

        registry.register("broken", broken, idempotent=True, max_retries=2)
        with pytest.raises(ToolFailedError, match=r"after 3 attempts.*RuntimeError: boom"):
            await executor.run("broken", {}, program_id="p", call_id="c")

    run_virtual(main())


def test_unknown_tool_and_bad_arguments_are_rejected() -> None:
    async def main() -> None:
        registry, executor = make()

        async def add(a: int, b: int) -> int:
            return a + b

        registry.register("add", add)
        with pytest.raises(UnknownToolError) as info:
            await executor.run("__import__('os').system", {}, program_id="p", call_id="x")
        assert info.value.status_code == 400 and "registered tools: add" in str(info.value)
        with pytest.raises(ToolArgumentError, match="missing a required argument: 'b'"):
            await executor.run("add", {"a": 1}, program_id="p", call_id="y")
        with pytest.raises(ToolArgumentError):
            await executor.run("add", {"a": 1, "b": 2, "c": 3}, program_id="p", call_id="z")
        assert await executor.run("add", {"a": 1, "b": 2}, program_id="p", call_id="w") == 3

    run_virtual(main())


def test_registry_rejects_bad_names_and_duplicates() -> None:
    registry = ToolRegistry()
    registry.register("ok_name", lambda: 1)
    with pytest.raises(ToolError, match="already registered"):
        registry.register("ok_name", lambda: 2)
    with pytest.raises(ToolError, match="invalid tool name"):
        registry.register("os.system", lambda: 3)
    assert registry.openai_tools()[0]["function"]["name"] == "ok_name"


def test_cancel_program_cancels_only_that_programs_tools() -> None:
    async def main() -> None:
        registry, executor = make()
        cancelled: list[str] = []

        async def wait(tag: str) -> str:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.append(tag)
                raise
            return tag

        registry.register("wait", wait)
        a = [
            asyncio.create_task(executor.run("wait", {"tag": f"a{i}"}, program_id="A", call_id=str(i)))
            for i in range(3)
        ]  # fmt: skip
        b = asyncio.create_task(executor.run("wait", {"tag": "b"}, program_id="B", call_id="0"))
        await asyncio.sleep(1)
        assert executor.cancel_program("A") == 3
        for task in a:
            with pytest.raises(ToolCancelledError, match="cancelled with its program"):
                await task
        assert sorted(cancelled) == ["a0", "a1", "a2"]
        assert await b == "b"
        assert executor.running_calls("A") == 0
        assert executor.stats()["wait"]["cancelled"] == 3

    run_virtual(main())


def test_cancelling_the_caller_cancels_the_tool() -> None:
    async def main() -> None:
        registry, executor = make()
        state = {"cleaned": False}

        async def long() -> None:
            try:
                await asyncio.sleep(100)
            finally:
                state["cleaned"] = True

        registry.register("long", long)
        task = asyncio.create_task(executor.run("long", {}, program_id="p", call_id="c"))
        await asyncio.sleep(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert state["cleaned"] and executor.running_calls("p") == 0

    run_virtual(main())


def test_records_report_tool_time_for_program_history() -> None:
    async def main() -> None:
        records: list[ToolCallRecord] = []
        registry = ToolRegistry()
        executor = ToolExecutor(registry, on_finish=records.append)

        async def nap(s: float) -> float:
            await asyncio.sleep(s)
            return s

        registry.register("nap", nap, max_concurrency=1)
        await asyncio.gather(
            executor.run("nap", {"s": 2.0}, program_id="p", call_id="first"),
            executor.run("nap", {"s": 1.0}, program_id="p", call_id="second"),
        )
        by_call = {r.call_id: r for r in records}
        assert by_call["first"].duration_s == pytest.approx(2.0)
        assert by_call["second"].wait_s == pytest.approx(2.0)  # waited for the slot
        assert by_call["second"].duration_s == pytest.approx(1.0)
        assert all(r.outcome == "ok" and r.attempts == 1 for r in records)
        assert executor.stats()["nap"]["latency_max_s"] == pytest.approx(2.0)

    run_virtual(main())


def test_sync_tools_do_not_block_the_event_loop() -> None:
    async def main() -> None:
        registry, executor = make()
        registry.register("sleepy", lambda: time.sleep(0.3) or "done")
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        assert await executor.run("sleepy", {}, program_id="p", call_id="c") == "done"
        t.cancel()
        assert ticks >= 10
        await executor.aclose()

    asyncio.run(main())
