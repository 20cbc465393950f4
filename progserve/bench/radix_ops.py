"""What the radix benchmark's sides share: one request of the trace, one cache's result,
and the interface every cache under test implements (`radix.py` drives them, the SGLang
adapter in `radix_sglang.py` is one of them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(slots=True)
class Request:
    program: str
    prompt: Any  # token ids in the trace's container
    output: Any


@dataclass(slots=True)
class RunResult:
    """One cache in one mode over the trace."""

    name: str
    prepacked: bool = False  # keys packed before the timed part (the tree alone)
    ops: int = 0
    seconds: float = 0.0  # thread CPU time of the timed ops
    prompt_tokens: int = 0
    matched_tokens: int = 0
    evicted_tokens: int = 0
    tree_tokens: int = 0

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def hit_rate(self) -> float:
        return self.matched_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class Side(Protocol):
    """One cache under test. `prepare` is untimed (KV slots, and the keys when prepacked);
    `op` is timed: the engine's sequence for one request (see the module docstring)."""

    result: RunResult

    def prepare(self, request: Request) -> object: ...

    def op(self, request: Request, prepared: object) -> tuple[int, int]:
        """Returns (matched tokens, evicted tokens)."""
        ...

    def size(self) -> int: ...
