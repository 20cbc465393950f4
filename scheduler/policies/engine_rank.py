"""A leveled policy's order as one engine rank (`engine_backend/engine_rank.py`: an int in
[0, RANK_MAX], lower first).

The MLFQ discretisation orders queued calls by (queue level, urgent first, arrival order),
so the rank packs the three into bit fields, most significant first:

    level (bits for K queues) | not urgent (1 bit) | arrival order (the rest)

Packing keeps the order exactly (no scaling, so no rounding): two calls the policy orders
get different ranks in that order, whatever their values. With the default 8 queues the
arrival order has 26 bits: 67M program arrivals (plain MLFQ: call arrivals) from an
origin. When the newest arrival outgrows that, the origin moves up to keep the newest half
(33M) of the range; an arrival older than the origin ranks 0 within its level and
urgency (its program would have stayed in flight across 33M younger arrivals), and calls
already at an engine when the origin moves keep their ranks while they finish. Both are
the only ways two calls the policy orders can share or swap ranks.
"""

from __future__ import annotations

from engine_backend.engine_rank import RANK_BITS


class LeveledRanks:
    __slots__ = ("_level_shift", "_not_urgent", "_span", "_origin")

    def __init__(self, levels: int) -> None:
        order_bits = RANK_BITS - 1 - (levels - 1).bit_length()
        self._level_shift = order_bits + 1
        self._not_urgent = 1 << order_bits
        self._span = 1 << order_bits
        self._origin = 0

    def rank(self, level: int, urgent: bool, order: int) -> int:
        offset = order - self._origin
        if offset >= self._span:
            self._origin = order - (self._span >> 1)
            offset = self._span >> 1
        elif offset < 0:
            offset = 0
        return (level << self._level_shift) | (0 if urgent else self._not_urgent) | offset
