"""`@program`: an async Python function that is an LLM program.

    @program
    async def answer(question: str) -> str:
        plan = gen(f"Plan how to answer: {question}", max_tokens=64)
        return await gen(f"{plan}\nNow answer: {question}")

    result = await answer.run(runtime, "Why is the sky blue?")
    result.value, result.latency_s, result.cached_tokens

Inside the function the primitives build the graph; `await` on a variable sends the
calls created so far and blocks on the value. A program ends when its function returns
*and* all its calls have finished; the return value may contain variables (they are
awaited). If the function raises or the run is cancelled, the program is cancelled on the
scheduler, with every call it has in flight.

Calling a program inside another one (`await helper(x)`) runs it as part of the caller.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, ParamSpec, TypeVar

from scheduler.spec import ProgramState

from .context import ClientToolTiming, ProgramContext
from .runtime import Runtime
from .variables import JoinedVariables, SemanticVariable

P = ParamSpec("P")
T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(slots=True)
class ProgramResult(Generic[T]):
    value: T
    program_id: str
    latency_s: float  # end to end, as the program's caller saw it
    state: ProgramState | None  # the scheduler's view at the end (None: no call was sent)
    client_tools: list[ClientToolTiming] = field(default_factory=list)
    # Whether the answer is right, when the caller checks it (the examples do):
    # {"passed": bool, "expected": what was checked, "why": how it failed}.
    check: dict[str, Any] | None = None

    @property
    def calls(self) -> int:
        return (len(self.state.calls) if self.state else 0) + len(self.client_tools)

    @property
    def prompt_tokens(self) -> int:
        return sum(c.prompt_tokens for c in self.state.calls) if self.state else 0

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.state.calls) if self.state else 0

    @property
    def cached_tokens(self) -> int:
        return sum(c.cached_tokens for c in self.state.calls) if self.state else 0

    def summary(self) -> str:
        return (
            f"program {self.program_id}: latency {self.latency_s:.3f} s, {self.calls} calls, "
            f"prompt tokens {self.prompt_tokens} (cached {self.cached_tokens}), "
            f"completion tokens {self.completion_tokens}"
        )


class Program(Generic[P, T]):
    def __init__(self, fn: Callable[P, Awaitable[T]], name: str) -> None:
        self.fn = fn
        self.name = name

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[T]:
        return self.fn(*args, **kwargs)

    async def run(
        self,
        runtime: Runtime,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> ProgramResult[T]:
        """Run the program on `runtime` (remote or local); see the module docstring."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        program_id = f"{self.name}-{uuid.uuid4().hex[:12]}"
        context = ProgramContext(runtime, program_id, {"program": self.name})
        token = context.activate()
        try:
            value = await self.fn(*args, **kwargs)
            resolved = await _resolve(value)
            await context.drain()
        except BaseException:
            await _abort_quietly(context)
            raise
        finally:
            context.deactivate(token)
        await context.end()
        latency = loop.time() - started
        state = await runtime.program_state(program_id) if context.submitted else None
        return ProgramResult(resolved, program_id, latency, state, context.client_timings)

    def __repr__(self) -> str:
        return f"<program {self.name}>"


def program(fn: Callable[P, Awaitable[T]]) -> Program[P, T]:
    """Mark an async function as an LLM program (see the module docstring)."""
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"@program needs an `async def` function, got {fn!r}")
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", fn.__name__) or "program"
    if not name[0].isalpha() and name[0] != "_":
        name = f"p_{name}"
    return Program(fn, name[:64])


async def _resolve(value: Any) -> Any:
    """Await the variables inside a return value (also inside lists, tuples and dicts)."""
    if isinstance(value, SemanticVariable | JoinedVariables):
        return await value
    if isinstance(value, list):
        return [await _resolve(v) for v in value]
    if isinstance(value, tuple):
        return tuple([await _resolve(v) for v in value])
    if isinstance(value, dict):
        return {k: await _resolve(v) for k, v in value.items()}
    return value


async def _abort_quietly(context: ProgramContext) -> None:
    # The program's own error is what the caller must see; a failure to cancel (the
    # server went away) is only logged.
    try:
        await asyncio.shield(context.abort())
    except Exception as exc:  # noqa: BLE001
        log.warning("cancelling program %s failed: %s", context.program_id, exc)
