"""Semantic variables (Parrot): named slots that one call fills and other calls read.

A `SemanticVariable` is a *handle*, returned at once by `gen` / `select` / `tool`. It
never blocks on creation. Interpolating it into a prompt (`f"... {v} ..."`, `str(v)`,
`"text" + v`) writes the placeholder `{{name}}`, which is how the data flow between calls
(the program's DAG) is captured. Awaiting it (`await v`, `await v.get()`) returns its
value; that is the only point where the program blocks, and the point where the DSL sends
the server every call created since the last await.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .context import ProgramContext


def placeholder(name: str) -> str:
    """How a variable is written into a prompt template: `{{name}}`."""
    return "{{" + name + "}}"


class SemanticVariable:
    """A value produced by one call of a program; see the module docstring."""

    __slots__ = ("name", "call_id", "_context")

    def __init__(self, name: str, call_id: str | None, context: ProgramContext) -> None:
        self.name = name
        self.call_id = call_id  # None for program inputs (`let`)
        self._context = context

    async def get(self) -> str:
        """The value; blocks until the producing call has finished."""
        return await self._context.value_of(self)

    def __await__(self) -> Generator[Any, None, str]:
        return self.get().__await__()

    async def stream(self) -> AsyncIterator[str]:
        """The value as it is generated, in deltas (the concatenation is the value)."""
        async for delta in self._context.stream_of(self):
            yield delta

    # -- interpolation into templates -------------------------------------------------
    def __format__(self, spec: str) -> str:
        if spec:
            raise TypeError(
                f"variable {self.name!r} has no value yet: format specs like {spec!r} need "
                f"the value, so `await` the variable first"
            )
        return placeholder(self.name)

    def __str__(self) -> str:
        return placeholder(self.name)

    def __add__(self, other: object) -> str:
        if isinstance(other, str | SemanticVariable):
            return placeholder(self.name) + str(other)
        return NotImplemented

    def __radd__(self, other: object) -> str:
        if isinstance(other, str):
            return other + placeholder(self.name)
        return NotImplemented

    # -- guard rails: a handle is not its value ---------------------------------------
    def __bool__(self) -> bool:
        raise TypeError(
            f"variable {self.name!r} was used as a condition before it has a value: "
            f"write `if await v:` (or `value = await v`) instead of `if v:`"
        )

    def __iter__(self) -> None:
        raise TypeError(f"variable {self.name!r} is not iterable: `await` it first")

    def __repr__(self) -> str:
        origin = f"call {self.call_id!r}" if self.call_id else "program input"
        return f"<SemanticVariable {self.name!r} from {origin}>"


class JoinedVariables:
    """The result of `join(...)`: several variables used as one.

    In a prompt it renders as their placeholders separated by `sep`, so the next call
    depends on all branches; awaiting it returns the list of their values.
    """

    __slots__ = ("variables", "sep")

    def __init__(self, variables: Iterable[SemanticVariable], sep: str = "\n") -> None:
        self.variables = list(variables)
        self.sep = sep

    async def get(self) -> list[str]:
        if not self.variables:
            return []
        context = self.variables[0]._context
        return await context.values_of(self.variables)

    def __await__(self) -> Generator[Any, None, list[str]]:
        return self.get().__await__()

    def __format__(self, spec: str) -> str:
        if spec:
            raise TypeError("joined variables take no format spec: `await` them first")
        return str(self)

    def __str__(self) -> str:
        return self.sep.join(placeholder(v.name) for v in self.variables)

    def __len__(self) -> int:
        return len(self.variables)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.variables)

    def __repr__(self) -> str:
        return f"<JoinedVariables {[v.name for v in self.variables]}>"
