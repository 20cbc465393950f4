"""The incremental tool interface (Conveyor's partial tool execution).

A tool that can start before its whole input exists implements `IncrementalTool`. The
executor makes one instance per call, feeds it each input part as soon as the LLM has
finished writing that part, and then calls `finish()`:

- `input_format = "json"`: a part is one complete top-level argument, `on_partial(name,
  value)`, delivered once per argument in the order the LLM wrote them;
- `input_format = "code"`: a part is one complete top-level statement of Python source,
  `on_partial("statement", source)`.

`on_partial` is awaited in order by a feeder task, never by the task that reads the
token stream, so a slow `on_partial` delays the tool, not decoding. Long work should be
started in `on_partial` and awaited in `finish`. `aclose()` is called exactly once at the
end, whether the call finished, failed, timed out or was cancelled.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar, Literal

InputFormat = Literal["json", "code"]
STATEMENT = "statement"  # the part name the code format uses


class IncrementalTool(abc.ABC):
    input_format: ClassVar[InputFormat] = "json"

    @abc.abstractmethod
    async def on_partial(self, name: str, value: Any) -> None:
        """One complete input part (an argument, or a statement in the code format)."""

    @abc.abstractmethod
    async def finish(self) -> Any:
        """All parts were delivered: return the tool's result."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources (a subprocess, background tasks). Called exactly once."""


IncrementalFactory = Callable[[], IncrementalTool]
