"""The engine-priority unit: what the scheduler hands an engine as `GenerateRequest.priority`.

An *engine rank* is an integer in `[0, RANK_MAX]`; lower is served first. The scheduler's
policy produces it (`scheduler/policies/engine_rank.py` packs a leveled policy's order into
it); each engine adapter maps it order-preservingly onto its engine's own field, so two
calls the policy orders never reach an engine with equal values:

- the in-process engines (sim, torch) order by it as is (lower first);
- SGLang (`engine_backend/sglang_http.py`): `priority` is an int32; by default SGLang
  serves *larger* values first, so the adapter sends `-rank`, or `rank` when the server
  runs `--schedule-low-priority-values-first`;
- vLLM (`engine_backend/openai_http.py`): `priority`, lower first, as is (the server must
  run `--scheduling-policy priority`).

`RANK_MAX` is 2**30 - 1: `rank` and `-rank` both fit an int32 with room to spare, so no
adapter ever clamps a rank. A value outside the unit reaches an adapter only as a client's
own hint (`priority_hint` with `scheduler.pass_priority` off); `clamp_rank` bounds it.
"""

from __future__ import annotations

RANK_BITS = 30
RANK_MAX = (1 << RANK_BITS) - 1


def clamp_rank(value: float) -> int:
    """An engine rank from any number: identity on ranks, bounded and rounded otherwise."""
    if type(value) is int and 0 <= value <= RANK_MAX:
        return value
    return min(max(round(value), 0), RANK_MAX)
