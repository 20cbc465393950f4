"""Open LLM calls per tenant, and the hook that admits new ones.

The scheduler counts each tenant's open LLM calls: created and not yet ended, queued,
running or pending (a graph program's calls count from its submission, so one request
cannot slip thousands of calls past a limit that was checked before it was read). Before
it creates calls it asks `check(tenant, n)`, which raises to refuse them (progserve's
admission gives each tenant a share of the queue: `progserve/overload.py`). Asking at
the moment of creation, with nothing awaited in between, means two requests can never
both be admitted into the same free room.
"""

from __future__ import annotations

from collections.abc import Callable

AdmissionCheck = Callable[[str, int], None]


class TenantCalls:
    __slots__ = ("open", "total", "ended", "check")

    def __init__(self) -> None:
        self.open: dict[str, int] = {}  # tenant -> open LLM calls (tenants with none absent)
        self.total = 0
        self.ended: dict[str, int] = {}  # tenant -> LLM calls ended so far (drain rates)
        self.check: AdmissionCheck | None = None

    def admit(self, tenant: str, n: int) -> None:
        """Raise (through `check`) if `tenant` may not open `n` more LLM calls now."""
        if n and self.check is not None:
            self.check(tenant, n)

    def opened(self, tenant: str) -> None:
        self.open[tenant] = self.open.get(tenant, 0) + 1
        self.total += 1

    def closed(self, tenant: str) -> None:
        left = self.open[tenant] - 1
        if left:
            self.open[tenant] = left
        else:
            del self.open[tenant]
        self.total -= 1
        self.ended[tenant] = self.ended.get(tenant, 0) + 1
